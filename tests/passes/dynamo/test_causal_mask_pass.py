"""The causal-mask pass: masks proven causal become ``is_causal=True``; every other mask stays."""

import pytest
import sympy
import torch
import torch.nn.functional as F

import mst_compile
from mst_compile.bench.models import build_llama
from mst_compile.passes.dynamo import causal_mask, mask_eval, mask_symbols
from tests.conftest import regions, rewrite

S = 24


def _sdpa_calls(gm):
    subs = [m for m in gm.modules() if isinstance(m, torch.fx.GraphModule)]
    return [n for g in subs for n in g.graph.nodes if n.op == "call_function" and n.target in causal_mask._SDPA]


def _qkv(q_len=S, k_len=S):
    g = torch.Generator().manual_seed(0)
    return (torch.randn(1, 2, q_len, 8, generator=g), torch.randn(1, 2, k_len, 8, generator=g),
            torch.randn(1, 2, k_len, 8, generator=g))  # fmt: skip


def _attn(mask_fn, q_len=S, k_len=S):
    def f(q, k, v):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask_fn(q.shape[-2], k.shape[-2]))

    return f, _qkv(q_len, k_len)


def _run(fn, args, dynamic=False):
    torch._dynamo.mark_dynamic(args[0], 2) if dynamic else None
    gm, ctx, ex = rewrite(fn, *args)
    return gm, regions(ctx, "mask"), ex


@pytest.mark.parametrize("dynamic", [False, True])
def test_hf_llama_mask_becomes_is_causal(dynamic):
    model = build_llama("llama-tiny", hidden_size=32, intermediate_size=96, vocab_size=320)
    ids = torch.randint(0, 320, (2, S))
    if dynamic:
        torch._dynamo.mark_dynamic(ids, 1)
    gm, ctx, ex = rewrite(lambda i: model(input_ids=i, labels=i).loss, ids)
    [rec] = regions(ctx, "mask")
    assert rec.status == "rewritten", rec.reason
    calls = _sdpa_calls(gm)
    assert len(calls) == 2 and all(c.kwargs["is_causal"] is True and c.kwargs["attn_mask"] is None for c in calls)
    # the whole mask subgraph is gone: no tokens x tokens comparison is left
    assert not [n for n in gm.graph.nodes if getattr(n.target, "__name__", n.target) in ("le", "diff", "cumsum")]
    if not dynamic:  # (symbolic example inputs can't run; the end-to-end tests cover dynamic shapes)
        torch.testing.assert_close(gm(*ex)[0], model(input_ids=ids, labels=ids).loss)


def test_hf_llama_checkpointed_layers(trace_checkpoints):
    """The mask is an operand of each checkpointed layer: rewritten inside the bodies, the operand dropped."""
    model = build_llama("llama-tiny", hidden_size=32, intermediate_size=96, vocab_size=320)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    trace_checkpoints(model)  # NOTE [checkpointed layer tracing]
    model.train()
    ids = torch.randint(0, 320, (1, S))
    gm, ctx, ex = rewrite(lambda i: model(input_ids=i, labels=i).loss, ids)
    assert [r.status for r in regions(ctx, "mask")] == ["rewritten"]
    calls = _sdpa_calls(gm)
    assert len(calls) == 2 and all(c.kwargs["is_causal"] is True for c in calls)
    assert "attention_mask" not in gm.code
    torch.testing.assert_close(gm(*ex)[0], model(input_ids=ids, labels=ids).loss)


def test_user_padding_mask_is_left_alone():
    model = build_llama("llama-tiny", hidden_size=32, intermediate_size=96, vocab_size=320)
    ids = torch.randint(0, 320, (2, S))
    am = torch.ones_like(ids)
    am[0, :5] = 0
    gm, ctx, _ = rewrite(lambda i, a: model(input_ids=i, attention_mask=a).logits, ids, am)
    [rec] = regions(ctx, "mask")
    assert rec.status == "skipped" and rec.reason
    assert all(c.kwargs["attn_mask"] is not None for c in _sdpa_calls(gm))


def test_sliding_window_is_left_alone():
    from transformers import MistralConfig, MistralForCausalLM

    cfg = MistralConfig(hidden_size=32, intermediate_size=96, num_hidden_layers=1, num_attention_heads=4,
                        num_key_value_heads=2, vocab_size=320, sliding_window=8, use_cache=False)  # fmt: skip
    model = MistralForCausalLM(cfg)
    ids = torch.randint(0, 320, (1, S))
    _, ctx, _ = rewrite(lambda i: model(input_ids=i).logits, ids)
    assert [r.status for r in regions(ctx, "mask")] == ["skipped"]
    assert "not the causal mask" in regions(ctx, "mask")[0].reason


@pytest.mark.parametrize("dynamic", [False, True])
def test_hand_written_tril_mask(dynamic):
    def fn(x):  # self-attention of one tensor: one symbolic length under dynamic shapes
        n = x.shape[-2]
        return F.scaled_dot_product_attention(x, x, x, attn_mask=torch.ones(n, n, dtype=torch.bool).tril())

    args = _qkv()[:1]
    gm, [rec], ex = _run(fn, args, dynamic)
    assert rec.status == "rewritten", rec.reason
    if not dynamic:
        torch.testing.assert_close(gm(*ex)[0], fn(*args))


@pytest.mark.parametrize(
    "mask_fn, why",
    [
        (lambda lq, lk: torch.arange(lk)[None, :] >= torch.arange(lq)[:, None], "anti-causal"),
        (lambda lq, lk: torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + 1, "one step ahead"),
        (lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril(-1), "diagonal excluded"),
        (lambda lq, lk: (torch.arange(lk)[None, :] <= torch.arange(lq)[:, None])
         & (torch.arange(lq)[:, None] - torch.arange(lk)[None, :] < 6), "sliding window 6"),  # fmt: skip
    ],
)
def test_near_causal_masks_are_left_alone(mask_fn, why):
    fn, args = _attn(mask_fn)
    gm, [rec], ex = _run(fn, args)
    assert rec.status == "skipped", why
    torch.testing.assert_close(gm(*ex)[0], fn(*args))


def test_query_shorter_than_keys_is_left_alone():
    """SDPA's is_causal is top-left aligned; a KV-cache style bottom-right mask is not that."""
    fn, args = _attn(lambda lq, lk: torch.arange(lk)[None, :] <= torch.arange(lq)[:, None] + (lk - lq), 8, S)
    _, [rec], _ = _run(fn, args)
    assert rec.status == "skipped" and "length" in rec.reason


def test_config_switch_and_counter():
    fn, args = _attn(lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril())
    gm, ctx, _ = rewrite(fn, *args, config=mst_compile.MSTConfig(causal_mask=False))
    assert regions(ctx, "mask") == [] and _sdpa_calls(gm)[0].kwargs["attn_mask"] is not None


def packed_causal_attention(q, k, v):
    """HF's packed-sequence detection in a causal mask: cumsum(diff(arange) != 1) is identically 0."""
    pos = torch.arange(S)[None]
    packed = (torch.diff(pos, prepend=pos[:, :1] - 1, dim=-1) != 1).cumsum(-1)
    causal = torch.arange(S)[None, :] <= torch.arange(S)[:, None]
    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal & (packed[0][:, None] == packed[0][None, :]))


def test_diff_and_cumsum_closed_forms():
    """HF's packed-sequence detection: cumsum(diff(arange) != 1) is identically 0."""
    gm, [rec], ex = _run(packed_causal_attention, _qkv())
    assert rec.status == "rewritten", rec.reason
    torch.testing.assert_close(gm(*ex)[0], packed_causal_attention(*_qkv()))


def test_is_kv_le_q_normal_forms():
    k, q = mask_symbols.IDX[0], mask_symbols.IDX[1]
    assert mask_symbols.is_kv_le_q(sympy.Le(k, q)) and mask_symbols.is_kv_le_q(sympy.Ge(q, k))
    assert mask_symbols.is_kv_le_q(sympy.Lt(k, q + 1)) and mask_symbols.is_kv_le_q(sympy.Gt(q + 1, k))
    assert not mask_symbols.is_kv_le_q(sympy.Lt(k, q)) and not mask_symbols.is_kv_le_q(sympy.Le(q, k))


# soundness: near-causal masks the proof must not mistake for the causal mask (NOTE [causal-mask proof])


def _wrap_at_row0(lq, lk):  # pos[-1] wraps: row 0 sees every key
    shifted = torch.arange(lq)[torch.arange(lq) - 1]
    return torch.arange(lk)[None, :] <= shifted[:, None] + 1


def _one_past_the_end(lq, lk):  # indices 1 - lq .. 0 wrap to 1 .. lq - 1, 0: every row sees every key
    shifted = torch.arange(lq)[torch.arange(lq) + 1 - lq]
    return torch.arange(lk)[None, :] <= shifted[:, None] + (lq - 1)


def _left_padding(lq, lk, pad=3):  # keys 0..pad-1 wrap to kv + lk: masked out, as left padding would be
    kv = torch.arange(lk)[torch.arange(lk) - pad] + pad
    return kv[None, :] <= torch.arange(lq)[:, None]


def _window_in_bool_compare(lq, lk):  # a boolean compared with an integer: (kv + 3 > q) != 0 is a window of 3
    kv, q = torch.arange(lk)[None, :], torch.arange(lq)[:, None]
    return (kv <= q) & ((kv + 3 > q) != 0)


def _window_by_relative_table(lq, lk, w=4):  # table[kv - q + w - 1] wraps exactly outside the window
    kv, q = torch.arange(lk)[None, :], torch.arange(lq)[:, None]
    return torch.arange(2 * lk)[kv - q + (w - 1)] <= w - 1


def _offset(dtype, c):
    return lambda lq, lk: (torch.arange(lk, dtype=dtype) + c)[None, :] <= (torch.arange(lq, dtype=dtype) + c)[:, None]


_UNSOUND = [
    (_wrap_at_row0, "negative index wraps"),
    (_one_past_the_end, "off by one: negative indices wrap at the end"),
    (_left_padding, "left padding through a wrapped index"),
    (_window_in_bool_compare, "sliding window hidden in a bool/int comparison"),
    (_window_by_relative_table, "sliding window through a wrapping relative-position table"),
    (_offset(torch.int8, 120), "int8 overflow"),
    (_offset(torch.uint8, -1), "uint8 underflow"),
    (_offset(torch.float16, 2040), "float16 rounds 2049 to 2048"),
]


def _self_attn(mask_fn):
    def f(x):
        n = x.shape[-2]
        return F.scaled_dot_product_attention(x, x, x, attn_mask=mask_fn(n, n))

    return f


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("mask_fn, why", _UNSOUND, ids=[w for _, w in _UNSOUND])
def test_unsound_near_causal_masks_are_left_alone(mask_fn, why, dynamic):
    fn = _self_attn(mask_fn)
    args = _qkv()[:1]
    expected = mask_fn(S, S)
    assert not torch.equal(expected, torch.ones(S, S, dtype=torch.bool).tril()), why  # truly not causal
    gm, [rec], ex = _run(fn, args, dynamic)
    assert rec.status == "skipped", why
    assert rec.reason and "internal error" not in rec.reason, rec.reason
    assert _sdpa_calls(gm)[0].kwargs["attn_mask"] is not None
    if not dynamic:
        torch.testing.assert_close(gm(*ex)[0], fn(*args), equal_nan=True)


@torch._dynamo.config.patch(capture_scalar_outputs=True)
def test_runtime_scalar_is_left_alone():
    """A value read from a runtime tensor (``.item()``) cancels symbolically, but float32 rounds ``kv + u``."""

    def f(q, k, v, off):
        u = off.item()
        kv = (torch.arange(S, dtype=torch.float32) + u) - u
        return F.scaled_dot_product_attention(q, k, v, attn_mask=kv[None, :] <= torch.arange(S)[:, None])

    args = (*_qkv(), torch.tensor(2**25))
    gm, [rec], ex = _run(f, args)
    assert rec.status == "skipped" and "internal error" not in rec.reason, rec.reason
    torch.testing.assert_close(gm(*ex)[0], f(*args))


def test_large_masks_are_decided_by_the_proof_alone(monkeypatch):
    """Where the subgraph's tensors are too large to evaluate, the proof alone decides (both ways)."""
    monkeypatch.setattr(mask_eval, "MAX_BYTES", 0)
    _, [rec], _ = _run(*_attn(lambda lq, lk: torch.ones(lq, lk, dtype=torch.bool).tril()))
    assert rec.status == "rewritten", rec.reason
    _, [rec], _ = _run(_self_attn(_wrap_at_row0), _qkv()[:1])
    assert rec.status == "skipped" and "index" in rec.reason, rec.reason


@pytest.mark.parametrize("dynamic", [False, True])
def test_concrete_evaluation_backs_the_proof(monkeypatch, dynamic):
    """Belt and braces: with the symbolic proof switched off, evaluating the mask subgraph at small concrete
    lengths still catches the wrapped index."""
    monkeypatch.setattr(causal_mask, "prove_causal", lambda *a, **k: None)
    fn = _self_attn(_wrap_at_row0)
    args = _qkv()[:1]
    gm, [rec], ex = _run(fn, args, dynamic)
    assert rec.status == "skipped" and "evaluat" in rec.reason, rec.reason
    if not dynamic:
        torch.testing.assert_close(gm(*ex)[0], fn(*args))


_SOUND = [  # (mask, why, also under dynamic shapes: a symbolic length is unbounded, so no narrow dtype)
    (lambda lq, lk: torch.arange(lk)[None, :] <= torch.arange(lq + 1)[torch.arange(lq) + 1][:, None] - 1,
     "an index proven inside [0, size)", True),
    (lambda lq, lk: torch.arange(lk)[None, :] <= torch.arange(lq)[torch.arange(lq) - lq][:, None],
     "an index proven negative wraps exactly", True),
    (_offset(torch.int16, 1000), "int16 without overflow", False),
    (lambda lq, lk: (torch.arange(lk, dtype=torch.float32) + 7)[None, :] <= torch.arange(lq)[:, None] + 7,
     "float32 holds small integers exactly", False),
]  # fmt: skip


@pytest.mark.parametrize("dynamic", [False, True])
@pytest.mark.parametrize("mask_fn, why, dynamic_too", _SOUND, ids=[w for _, w, _ in _SOUND])
def test_causal_masks_with_checked_indices_and_dtypes_are_rewritten(mask_fn, why, dynamic_too, dynamic):
    if dynamic and not dynamic_too:
        pytest.skip("a symbolic length is unbounded: a narrow dtype's range can't be proven")
    fn = _self_attn(mask_fn)
    args = _qkv()[:1]
    gm, [rec], ex = _run(fn, args, dynamic)
    assert rec.status == "rewritten", (why, rec.reason)
    if not dynamic:
        torch.testing.assert_close(gm(*ex)[0], fn(*args))


def test_wrapped_index_reproduction_end_to_end():
    """The reported reproduction, compiled by the mst backend with Inductor: left alone, same output as eager."""
    n = 16

    def f(q, k, v):
        pos = torch.arange(n)
        shifted = pos[torch.arange(n) - 1]
        mask = torch.arange(n)[None, :] <= shifted[:, None] + 1
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    q, k, v = _qkv(n, n)
    out = torch.compile(f, backend="mst")(q, k, v)
    torch.testing.assert_close(out, f(q, k, v))
    masks = [r for rep in mst_compile.reports() for r in rep.regions if r.kind == "mask"]
    assert masks and all(r.status == "skipped" for r in masks), [r.line() for r in masks]
