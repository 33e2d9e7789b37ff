"""The embedded tiny model: deterministic from its seed, cached, rebuilt when the cache is corrupt."""

import shutil

import torch

from harness.models import tiny
from harness.models.load import load_model


def test_same_seed_same_weights(tmp_path, monkeypatch):
    a = tiny.tiny_model_dir("retain99")
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path))
    b = tiny.tiny_model_dir("retain99")
    assert a != b
    ma, mb = load_model(str(a)), load_model(str(b))
    sa, sb = ma.state_dict(), mb.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    n = sum(p.numel() for p in ma.parameters())
    assert 50_000 < n < 1_000_000
    assert (a.parent / "base" / "tokenizer.json").read_bytes() == (b.parent / "base" / "tokenizer.json").read_bytes()


def test_corrupt_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("HARNESS_HOME", str(tmp_path))
    d = tiny.tiny_model_dir("base")
    (d / ".complete").unlink()
    (d / "model.safetensors").write_bytes(b"garbage")
    d2 = tiny.tiny_model_dir("base")
    assert d2 == d and (d / ".complete").is_file()
    load_model(str(d2))
    shutil.rmtree(tmp_path / "tiny")


def test_checkpoint_dir_carries_its_template(tiny_full_dir):
    """``--model <tiny dir>`` scores like the profile: the directory holds its prompt template."""
    from harness.models.profiles import resolve_model
    from harness.plugins import get_registry

    task = get_registry().tasks["tofu_forget01"]
    choice = resolve_model(str(tiny_full_dir), task)
    assert choice.template == tiny.TINY_TEMPLATE
    assert resolve_model("tiny", task).template == choice.template
