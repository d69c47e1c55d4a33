"""NOTE [verify]: parity checked on the user's own model, on the first call of each rewritten graph."""

import pytest
import torch

import mst_compile
from mst_compile.bench import zoo
from mst_compile.verify import VerifyError


def _ids():
    return torch.randint(0, zoo.V, (1, 48), generator=torch.Generator().manual_seed(0))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_passes_on_zoo_models(arch, recwarn):
    model = zoo.build(arch)
    cm = torch.compile(model, backend="mst", options={"verify": "raise", "num_chunks": 3, "compiler": "aot_eager"})
    ids = _ids()
    cm(input_ids=ids, labels=ids).loss.backward()
    rep = [r for r in mst_compile.reports() if r.rewritten()]
    assert rep and all(r.verify for r in rep)
    checks = [c for r in rep for c in r.verify]
    assert any(c.what.startswith("gradient") for c in checks) and all(c.ok for c in checks)
    assert not [w for w in recwarn if "verify" in str(w.message)]


def _drop_last_chunk(monkeypatch):
    """A wrong rewrite: the chunk loops skip their last chunk (its rows keep whatever the buffer held)."""
    from mst_compile.ops import chunking

    real = chunking.chunk_bounds

    def wrong(*a, **k):
        return list(real(*a, **k))[:-1]

    monkeypatch.setattr(chunking, "chunk_bounds", wrong)


@pytest.mark.parametrize("mode", ["warn", "raise"])
def test_catches_an_injected_wrong_rewrite(monkeypatch, mode):
    _drop_last_chunk(monkeypatch)
    model = zoo.build("llama")
    cm = torch.compile(model, backend="mst", options={"verify": mode, "num_chunks": 3, "compiler": "aot_eager"})
    ids = _ids()
    if mode == "raise":
        with pytest.raises(VerifyError, match="MISMATCH"):
            cm(input_ids=ids, labels=ids)
    else:
        with pytest.warns(UserWarning, match="mst verify"):
            cm(input_ids=ids, labels=ids)
        bad = [c for r in mst_compile.reports() for c in r.verify if not c.ok]
        assert any(c.what == "output 0" for c in bad)  # the loss


def test_verify_costs_nothing_after_the_first_call(monkeypatch):
    from mst_compile import verify

    calls = []
    real = verify.compare
    monkeypatch.setattr(verify, "compare", lambda *a: calls.append(1) or real(*a))
    model = zoo.build("llama")
    cm = torch.compile(model, backend="mst", options={"verify": True, "num_chunks": 3, "compiler": "aot_eager"})
    ids = _ids()
    for _ in range(3):
        cm(input_ids=ids, labels=ids).loss.backward()
    assert len(calls) == 1


def test_option_and_environment(monkeypatch):
    assert mst_compile.MSTConfig(verify="raise").verify == "raise"
    with pytest.raises(ValueError, match="verify"):
        mst_compile.MSTConfig(verify="sometimes")
    monkeypatch.setenv("MST_VERIFY", "raise")
    from mst_compile.config import from_env

    assert from_env().verify == "raise"
    monkeypatch.setenv("MST_VERIFY", "1")
    assert from_env().verify is True
