"""Architecture table: for each zoo architecture (8x test size, V=32000, fp32), regions rewritten and the
compiled-step peak of mst vs ``torch.compile`` default, each arm in its own process.

    python -m mst_compile.bench.archs --tokens 2048
"""

from __future__ import annotations


from .cli import parser
from .measure import run_worker
from .zoo import ARCHS


def main(argv=None) -> None:
    p = parser("python -m mst_compile.bench.archs", __doc__)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch 1)")
    p.add_argument("--archs", default=",".join([*ARCHS, "nanogpt"]), help="comma-separated zoo architectures")
    a = p.parse_args(argv)
    print(f"{'arch':<10} {'regions':>7} {'compile MiB':>11} {'mst MiB':>8} {'ratio':>6}")
    for name in a.archs.split(","):
        res = {arm: run_worker(["--arm", arm, "--model", f"zoo:{name}", "--tokens", str(a.tokens), "--steps", "1"])
               for arm in ("compile", "mst")}  # fmt: skip
        if any("peak_mib" not in r for r in res.values()):
            print(f"{name:<10} FAILED {[r.get('error', '')[-200:] for r in res.values()]}")
            continue
        c, m = res["compile"]["peak_mib"], res["mst"]["peak_mib"]
        print(f"{name:<10} {res['mst']['rewritten']:>7} {c:>11.0f} {m:>8.0f} {m / c:>6.2f}", flush=True)


if __name__ == "__main__":
    main()
