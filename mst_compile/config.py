"""Settings of the ``mst`` backend: a frozen dataclass, built from ``options=``, a global default and the
environment.

Precedence (highest first): ``torch.compile(..., options={...})``; the process default set with
:func:`set_config` / :func:`config_context`; ``MST_*`` environment variables; the dataclass defaults.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from dataclasses import dataclass, field
from typing import Any, Iterator

LOGITS_MODES = ("full", "skip")
COMPILERS = ("inductor", "aot_eager")
RECOMPUTE_MODES = ("none", "norms", "attention")
VERIFY_MODES = (False, True, "warn", "raise")
COMPILE_BODIES = ("cuda", "always", "never")


@dataclass(frozen=True)
class MSTConfig:
    """What the backend rewrites and how finely it chunks.

    - ``mlp`` / ``head``: turn the MLP and the vocabulary-projection + cross-entropy rewrites on or off.
    - ``num_chunks``: fixed number of mini-sequences for every region (``None``: chosen from the shapes).
    - ``chunk_tokens``: fixed tokens per mini-sequence instead (exclusive with ``num_chunks``).
    - ``chunk_memory_mib``: a memory budget instead: each region gets as many chunks as keep one chunk's
      intermediate (the MLP's widened tensors; the head's fp32 logits) under this many MiB, at any length
      (exclusive with ``num_chunks`` and ``chunk_tokens``).
    - ``causal_mask``: an attention mask proven to be the plain causal mask (HF builds one under tracing) is
      replaced by ``is_causal=True``, so no ``tokens x tokens`` mask is built or saved.
    - ``logits``: when the model also returns the logits next to a loss it computes:
      ``"full"`` returns them, produced once in the model's dtype chunk by chunk, differentiable;
      ``"skip"`` does not materialize them; reading them raises an error (Liger's ``skip_logits``).
    - ``min_chunk_tokens``: with the automatic chunk count, no chunk is made smaller than this many tokens
      (``None``: 512, lowered toward 256 for a layer whose 512-token chunk would exceed 64 MiB: see
      ``plan.min_rows`` and NOTE [minimum chunk]).
    - ``recompute``: what backward recomputes instead of keeping from the forward (NOTE [selective recompute]):
      ``"attention"`` (default) the norm outputs and the attention's q, k, v (their projection GEMMs run again
      right before the attention backward); ``"norms"`` the norm outputs only (no GEMM repeated); ``"none"``
      leaves the choice to Inductor's partitioner.
    - ``min_expansion``: a linear must widen its input by at least this factor to start an MLP region.
    - ``inductor``: options passed through to Inductor's ``compile_fx`` (``torch._inductor.config`` keys).
    - ``enabled``: ``False`` compiles exactly as plain Inductor would (an A/B switch).
    - ``compiler``: what compiles the rewritten graph: ``"inductor"`` (default), or ``"aot_eager"`` (AOTAutograd
      without code generation: fast, for debugging and tests).
    - ``dump_dir``: write each graph's code before and after every pass into this folder.
    - ``compile_bodies``: run each MLP chunk's row-wise middle, and each head chunk's cross-entropy with any
      row-wise tail before it (softcap, scaling), as Inductor code (NOTE [compiled bodies]):
      ``"cuda"`` (default) on CUDA devices, ``"always"``, or ``"never"`` (op by op, as on the CPU by default,
      where the chunks are compute-bound and a body's C++ compile costs seconds).
    - ``verify``: ``True`` (or ``"warn"``) / ``"raise"``: on the first call of each rewritten graph, also run the
      original graph and compare every output and gradient (NOTE [verify]); a mismatch warns or raises.
    """

    mlp: bool = True
    head: bool = True
    causal_mask: bool = True
    num_chunks: int | None = None
    chunk_tokens: int | None = None
    chunk_memory_mib: float | None = None
    logits: str = "full"
    min_chunk_tokens: int | None = None
    recompute: str = "attention"
    min_expansion: float = 1.5
    inductor: dict = field(default_factory=dict)
    enabled: bool = True
    compiler: str = "inductor"
    dump_dir: str | None = None
    verify: bool | str = False
    compile_bodies: str = "cuda"

    def __post_init__(self):
        _check_int("num_chunks", self.num_chunks)
        _check_int("chunk_tokens", self.chunk_tokens)
        _check_int("min_chunk_tokens", self.min_chunk_tokens)
        fixed = [n for n in ("num_chunks", "chunk_tokens", "chunk_memory_mib") if getattr(self, n) is not None]
        if len(fixed) > 1:
            raise ValueError(f"mst: set at most one of 'num_chunks', 'chunk_tokens', 'chunk_memory_mib' (got {fixed})")
        b = self.chunk_memory_mib
        if b is not None and (isinstance(b, bool) or not isinstance(b, (int, float)) or not b > 0):
            raise ValueError(f"mst: option 'chunk_memory_mib' must be a positive number or None, got {b!r}")
        if self.logits not in LOGITS_MODES:
            raise ValueError(f"mst: option 'logits' must be one of {LOGITS_MODES}, got {self.logits!r}")
        for name in ("mlp", "head", "causal_mask", "enabled"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"mst: option {name!r} must be a bool, got {getattr(self, name)!r}")
        if not isinstance(self.min_expansion, (int, float)) or self.min_expansion <= 1.0:
            raise ValueError(f"mst: option 'min_expansion' must be a number > 1, got {self.min_expansion!r}")
        if self.recompute not in RECOMPUTE_MODES:
            raise ValueError(f"mst: option 'recompute' must be one of {RECOMPUTE_MODES}, got {self.recompute!r}")
        if self.compiler not in COMPILERS:
            raise ValueError(f"mst: option 'compiler' must be one of {COMPILERS}, got {self.compiler!r}")
        if self.compile_bodies not in COMPILE_BODIES:
            raise ValueError(
                f"mst: option 'compile_bodies' must be one of {COMPILE_BODIES}, got {self.compile_bodies!r}"
            )
        if self.verify not in VERIFY_MODES:
            raise ValueError(f"mst: option 'verify' must be one of {VERIFY_MODES}, got {self.verify!r}")
        if not isinstance(self.inductor, dict):
            raise ValueError(f"mst: option 'inductor' must be a dict of Inductor config keys, got {self.inductor!r}")

    def replace(self, **changes: Any) -> "MSTConfig":
        return dataclasses.replace(self, **changes)

    def compiles_bodies(self, device_type: str) -> bool:
        """Whether a chunk body on ``device_type`` runs as Inductor code (``compile_bodies``)."""
        return self.compile_bodies == "always" or (self.compile_bodies == "cuda" and device_type == "cuda")

    def min_rows(self, row_bytes: int) -> int:
        """The automatic policy's smallest chunk in tokens (``plan.min_rows``)."""
        from .plan import min_rows

        return min_rows(self, row_bytes)


def _check_int(name: str, value) -> None:
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"mst: option {name!r} must be a positive int or None, got {value!r}")


OPTION_NAMES = tuple(f.name for f in dataclasses.fields(MSTConfig))

_ENV = {
    "MST_ENABLED": "enabled",
    "MST_MLP": "mlp",
    "MST_HEAD": "head",
    "MST_CAUSAL_MASK": "causal_mask",
    "MST_NUM_CHUNKS": "num_chunks",
    "MST_CHUNK_TOKENS": "chunk_tokens",
    "MST_CHUNK_MEMORY_MIB": "chunk_memory_mib",
    "MST_LOGITS": "logits",
    "MST_MIN_CHUNK_TOKENS": "min_chunk_tokens",
    "MST_MIN_EXPANSION": "min_expansion",
    "MST_RECOMPUTE": "recompute",
    "MST_COMPILER": "compiler",
    "MST_DUMP_DIR": "dump_dir",
    "MST_VERIFY": "verify",
    "MST_COMPILE_BODIES": "compile_bodies",
}
_default: MSTConfig | None = None


def parse_option(name: str, raw: str):
    """An option's value from text (an environment variable, a command line), typed as the option is."""
    kind = {f.name: f.type for f in dataclasses.fields(MSTConfig)}[name]
    if name == "verify" and raw.lower() in ("warn", "raise"):
        return raw.lower()
    if "bool" in str(kind):
        if raw.lower() in ("1", "true", "yes", "on"):
            return True
        if raw.lower() in ("0", "false", "no", "off"):
            return False
        raise ValueError(f"mst: environment variable for {name!r} must be a boolean, got {raw!r}")
    if "int" in str(kind):
        try:
            return None if raw.lower() in ("", "none", "auto") else int(raw)
        except ValueError:
            raise ValueError(f"mst: environment variable for {name!r} must be an int, got {raw!r}") from None
    if "float" in str(kind):
        return None if raw.lower() in ("", "none", "auto") else float(raw)
    return raw


def from_env() -> MSTConfig:
    kw = {field_: parse_option(field_, os.environ[var]) for var, field_ in _ENV.items() if var in os.environ}
    return MSTConfig(**kw)


def get_config() -> MSTConfig:
    """The process default: what :func:`set_config` set, else what the environment says."""
    return _default if _default is not None else from_env()


def set_config(config: MSTConfig | None = None, **changes: Any) -> MSTConfig:
    """Set the process default (for callers that cannot pass ``options=``, such as HF Trainer)."""
    global _default
    base = config if config is not None else get_config()
    _default = resolve(changes, base)
    return _default


@contextlib.contextmanager
def config_context(**changes: Any) -> Iterator[MSTConfig]:
    global _default
    old = _default
    try:
        yield set_config(**changes)
    finally:
        _default = old


def resolve(options: dict | MSTConfig | None, base: MSTConfig | None = None) -> MSTConfig:
    """``options`` (a dict from ``torch.compile(options=...)`` or a config) applied over ``base``."""
    base = base if base is not None else get_config()
    if options is None:
        return base
    if isinstance(options, MSTConfig):
        return options
    if not isinstance(options, dict):
        raise ValueError(f"mst: options must be a dict, got {type(options).__name__}")
    unknown = sorted(set(options) - set(OPTION_NAMES))
    if unknown:
        raise ValueError(f"mst: unknown option(s) {unknown}; valid options are {list(OPTION_NAMES)}")
    changes = dict(options)
    # the three chunk-size settings replace each other: setting one clears the others of the base
    sizing = ("num_chunks", "chunk_tokens", "chunk_memory_mib")
    if any(k in changes for k in sizing):
        changes = {**{k: None for k in sizing}, **changes}
    return dataclasses.replace(base, **changes)
