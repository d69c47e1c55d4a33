"""The passes on Inductor's aten graphs (joint, forward, backward), installed as Inductor custom passes."""
