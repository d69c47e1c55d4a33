"""The passes on Dynamo's graph (torch-level ops), before AOTAutograd; their order is ``passes.PASSES``."""
