"""Architecture table: for each zoo architecture (8x test size, V=32000), regions rewritten, the compiled-step
peak and the first call's time (compilation included, cold Inductor cache) of mst vs ``torch.compile`` default,
each arm in its own process; "net" columns: that time less one later step's (the compilation alone, which a
slow step would otherwise hide: bf16 GEMMs on a CPU without bf16 instructions). The zoo includes Gemma-3 with
a 16-token sliding window; ``--dtype bfloat16`` runs every architecture with bf16 parameters.

    python -m mst_compile.bench.archs --tokens 2048 [--dtype bfloat16] [--form model]
"""

from __future__ import annotations

import tempfile

from .cli import parser
from .measure import run_worker
from .zoo import ARCHS


def main(argv=None) -> None:
    p = parser("python -m mst_compile.bench.archs", __doc__)
    p.add_argument("--tokens", type=int, default=2048, help="tokens per step (batch 1)")
    p.add_argument("--archs", default=",".join([*ARCHS, "nanogpt"]), help="comma-separated zoo architectures")
    p.add_argument("--dtype", default="float32", help="parameter dtype (float32, bfloat16, float16)")
    p.add_argument("--form", default="step", help="step (the loss is returned) or model (the logits too)")
    a = p.parse_args(argv)
    print(f"{'arch':<10} {'regions':>7} {'compile MiB':>11} {'mst MiB':>8} {'ratio':>6} "
          f"{'compile s':>9} {'mst s':>6} {'ratio':>6} {'net compile s':>13} {'net mst s':>9} "
          f"{'ratio':>6}")  # fmt: skip
    for name in a.archs.split(","):
        args = ["--model", f"zoo:{name}", "--tokens", str(a.tokens), "--steps", "1", "--dtype", a.dtype,
                "--form", a.form]  # fmt: skip
        # a cold Inductor cache per process: the first call's time is a whole compilation
        res = {arm: run_worker(["--arm", arm, *args], env={"TORCHINDUCTOR_CACHE_DIR": tempfile.mkdtemp(prefix="mst_")})
               for arm in ("compile", "mst")}  # fmt: skip
        if any("peak_mib" not in r for r in res.values()):
            print(f"{name:<10} FAILED {[r.get('error', '')[-200:] for r in res.values()]}")
            continue
        c, m = res["compile"]["peak_mib"], res["mst"]["peak_mib"]
        ct, mt = res["compile"]["compile_s"], res["mst"]["compile_s"]
        cn, mn = (res[k]["compile_s"] - res[k]["step_s_median"] for k in ("compile", "mst"))
        print(f"{name:<10} {res['mst']['rewritten']:>7} {c:>11.0f} {m:>8.0f} {m / c:>6.2f} {ct:>9.1f} {mt:>6.1f} "
              f"{mt / ct:>6.2f} {cn:>13.1f} {mn:>9.1f} {mn / cn:>6.2f}", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
