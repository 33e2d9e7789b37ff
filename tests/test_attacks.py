"""Attacks (docs/attacks.md): quantization barely moves an 8-bit model's forget probability, relearning on
half the forget set raises it on the other half, the saved model and the reference cache stay as they
were, unknown names get did-you-mean, and the attacks are part of the run hash."""

import hashlib
import json
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from harness import HarnessError, plugins
from harness.attacks import Attack, AttackInput
from harness.attacks.relearn import Relearn, split_rows
from harness.commands.run import expand
from harness.options import RunOptions
from harness.tasks import parse_task

NAME = "t14_attack"
# forget_quality needs the retain model (scored once, cached under $HARNESS_HOME/references)
TASK = f"""\
task: {NAME}
include: {ROOT}/tasks/tofu/_base.yaml
data:
  forget: {{path: locuslab/TOFU, name: forget01}}
  retain: {{path: locuslab/TOFU, name: retain99}}
  forget_eval: {{path: locuslab/TOFU, name: forget01_perturbed}}
  holdout: {{path: locuslab/TOFU, name: holdout01}}
metrics: [forget_Q_A_Prob, forget_truth_ratio, forget_quality]
reference: tiny:retain99
"""
LIMIT = "20"  # 20 forget rows: relearning trains on 10 and scores the other 10


@pytest.fixture(autouse=True)
def fresh_registry(monkeypatch):
    monkeypatch.setattr(plugins, "_CACHE", {})


@pytest.fixture(scope="module")
def tasks_dir(tmp_path_factory):
    d = tmp_path_factory.mktemp("attack_tasks")
    (d / f"{NAME}.yaml").write_text(TASK)
    return d


def _run(tasks_dir, out, *extra):
    return run_cli("run", "-t", NAME, "--include-tasks", tasks_dir, "-m", "grad_diff", "--model", "tiny:full",
                   "--limit", LIMIT, "-o", out, *extra)


def _snapshot(d: Path) -> dict:
    return {str(p.relative_to(d)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(d.rglob("*")) if p.is_file()}


def _cell(out: Path, method: str = "grad_diff") -> Path:
    (scores,) = (out / "tiny_full" / NAME / method).glob("*/scores.json")
    return scores.parent


@pytest.fixture(scope="module")
def attacked(tasks_dir, tmp_path_factory):
    """A plain run (fills the reference cache), then the same cell attacked, with the model saved."""
    import os

    out = tmp_path_factory.mktemp("attack_runs")
    _run(tasks_dir, out / "plain")
    refs = Path(os.environ["HARNESS_HOME"]) / "references"
    before = _snapshot(refs)
    _, stdout, _ = _run(tasks_dir, out / "attacked", "--attacks", "quant8,relearn", "--save-model")
    return {"dir": _cell(out / "attacked"), "plain": _cell(out / "plain"), "refs": refs, "refs_before": before,
            "stdout": stdout, "out": out / "attacked"}


def _scores(d: Path) -> dict:
    return json.loads((d / "scores.json").read_text())


def test_quant8_barely_moves_forget_probability(attacked):
    m = _scores(attacked["dir"])["metrics"]
    plain, q8 = m["forget_Q_A_Prob"]["value"], m["attack/quant8/forget_Q_A_Prob"]["value"]
    assert m["attack/quant8/before/forget_Q_A_Prob"]["value"] == plain
    assert q8 != plain  # the weights really were quantized
    assert abs(q8 - plain) / plain < 0.02
    rec = _scores(attacked["dir"])["attacks"]["quant8"]
    assert rec["info"]["library"] == "bitsandbytes" and rec["info"]["bits"] == 8 and rec["info"]["library_version"]
    assert rec["info"]["layers_quantized"] > 0 and "lm_head" in rec["info"]["skipped"]


def test_relearning_raises_forget_probability_on_held_out_half(attacked):
    doc = _scores(attacked["dir"])
    m, info = doc["metrics"], doc["attacks"]["relearn"]["info"]
    assert m["attack/relearn/forget_Q_A_Prob"]["value"] > m["attack/relearn/before/forget_Q_A_Prob"]["value"]
    assert len(info["train_rows"]) == len(info["heldout_rows"]) == 10
    assert not set(info["train_rows"]) & set(info["heldout_rows"])
    assert info["steps"] > 0 and doc["attacks"]["relearn"]["settings"]["fraction"] == 0.5
    # forget_quality on the held-out half: the reference scored on the same 10 rows
    assert m["attack/relearn/forget_quality"]["value"] is not None
    rows = [json.loads(x) for x in (attacked["dir"] / "samples.jsonl").read_text().splitlines()]
    assert sum(r["metric"] == "attack/relearn/forget_Q_A_Prob" for r in rows) == 10
    assert sum(r["metric"] == "attack/quant8/forget_Q_A_Prob" for r in rows) == 20
    export = json.loads((attacked["dir"] / "TOFU_EVAL.json").read_text())
    assert len(export["attack/relearn/forget_Q_A_Prob"]["value_by_index"]) == 10
    assert "attack/relearn/forget_quality" in json.loads((attacked["dir"] / "TOFU_SUMMARY.json").read_text())
    assert "relearn" in attacked["stdout"] and "quant8" in attacked["stdout"]  # the attack table is printed


def test_saved_model_and_reference_cache_untouched(attacked):
    from harness.models.load import load_model, load_tokenizer
    from harness.scoring.evaluate import evaluate_task

    after = _snapshot(attacked["refs"])
    for name, entry in attacked["refs_before"].items():
        assert after[name] == entry, f"reference cache file {name} was rewritten"
    # the saved checkpoint is the unlearned model, not an attacked copy: it scores the run's own value
    d = attacked["dir"]
    model, tok = load_model(d / "model"), load_tokenizer(d / "model")
    assert all(p.dtype.is_floating_point for p in model.parameters())
    from harness.data.encode import Template

    task = parse_task(ROOT / "tasks" / "tofu" / "tofu_forget01.yaml")  # the same forget_eval rows
    tmpl = Template(**_scores(d)["eval"]["template"])
    got = evaluate_task(task, model, tok, tmpl, metrics=["forget_Q_A_Prob"], limit=int(LIMIT), progress=False)
    assert got["forget_Q_A_Prob"].value == pytest.approx(_scores(d)["metrics"]["forget_Q_A_Prob"]["value"], rel=1e-6)


def test_baseline_row_attacked_and_report(attacked, tmp_path):
    base = _scores(_cell(attacked["out"], "finetuned"))
    assert "attack/quant8/forget_Q_A_Prob" in base["metrics"] and "relearn" in base["attacks"]
    _, text, _ = run_cli("report", attacked["out"], "--plot", tmp_path / "p.png")
    section = text.split("## Attacks: before and after", 1)[1]
    assert "GradDiff" in section and "relearn" in section and "recovered" in section
    assert (tmp_path / "p_attacks.png").stat().st_size > 1000


def test_unknown_attack_did_you_mean(tasks_dir, tmp_path):
    rc, _, err = run_cli("run", "-t", NAME, "--include-tasks", tasks_dir, "-m", "grad_diff", "--model", "tiny:full",
                         "--attacks", "quant44", "-o", tmp_path, "--dry-run", check=False)
    assert rc != 0 and "unknown attack 'quant44'" in err and "did you mean 'quant4'" in err
    _, out, _ = run_cli("ls", "attacks")
    assert all(n in out for n in ("quant8", "quant4", "relearn"))


def test_attacks_are_part_of_the_run_hash(tasks_dir):
    reg = plugins.build_registry(include_tasks=[tasks_dir], strict=True)
    dirs = {}
    for attacks in (None, "quant4", "relearn", "quant4,relearn"):
        opts = RunOptions(tasks=NAME, methods="grad_diff", model="tiny:full", include_tasks=[str(tasks_dir)],
                          attacks=attacks)
        (cell,) = expand(opts, reg)
        dirs[attacks] = cell.dir.name
    assert len(set(dirs.values())) == 4


def test_task_attack_block_is_checked(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(TASK.replace(f"task: {NAME}", "task: bad") + "attack: {metricz: [forget_Q_A_Prob]}\n")
    with pytest.raises(HarnessError, match="did you mean 'metrics'"):
        parse_task(bad)
    bad.write_text(TASK.replace(f"task: {NAME}", "task: bad") + "attack: {relearn: {heldout: [forget_evl]}}\n")
    with pytest.raises(HarnessError, match="forget_evl"):
        parse_task(bad)


def test_relearn_split_and_training_are_deterministic(tiny_full_dir):
    from harness.data.encode import Template
    from harness.models.load import load_model, load_tokenizer

    assert split_rows(40, 0.5, 0) == split_rows(40, 0.5, 0) != split_rows(40, 0.5, 1)
    with pytest.raises(HarnessError, match="no rows"):
        split_rows(1, 0.5, 0)
    task = parse_task(ROOT / "tasks" / "tofu" / "tofu_forget01.yaml")
    model, tok = load_model(tiny_full_dir), load_tokenizer(tiny_full_dir)
    tmpl = Template(user_start_tag="<|user|>", user_end_tag="", asst_start_tag="<|assistant|>", asst_end_tag="\n")
    start = {k: v.clone() for k, v in model.state_dict().items()}
    runs = [Relearn(epochs=1).apply(AttackInput(model, tok, task, tmpl, seed=3, training={"lr": 5e-4}, limit=8))
            for _ in range(2)]
    a, b = (dict(r.model.named_parameters()) for r in runs)
    assert all((a[k] == b[k]).all() for k in a)
    assert any((a[k] != start[k]).any() for k in a)
    assert all((v == start[k]).all() for k, v in model.state_dict().items())  # the input model is untouched


def test_plugin_attack_registers():
    from dataclasses import dataclass
    from types import SimpleNamespace

    from harness import hookimpl

    @dataclass
    class Noop(Attack):
        name = "t14_noop"

    @hookimpl
    def register_attacks(register):
        register(Noop)

    reg = plugins.build_registry(extra_plugins=[SimpleNamespace(register_attacks=register_attacks)], strict=True)
    assert reg.attacks["t14_noop"] is Noop


def test_attack_settings_from_the_command_line_are_typed_recorded_and_hashed(tasks_dir):
    reg = plugins.build_registry(include_tasks=[tasks_dir], strict=True)

    def cell(*settings):
        opts = RunOptions(tasks=NAME, methods="grad_diff", model="tiny:full", include_tasks=[str(tasks_dir)],
                          attacks="quant4,relearn", attack_set=list(settings))
        (c,) = expand(opts, reg)
        return c

    plain, set_ = cell(), cell("relearn.epochs=3", "relearn.lr=1e-4", "quant4.quant_type=fp4")
    assert plain.dir.name != set_.dir.name
    rec = set_.config["attacks"]["attacks"]
    assert rec["relearn"]["settings"]["epochs"] == 3 and rec["relearn"]["settings"]["lr"] == 1e-4
    assert rec["quant4"]["settings"]["quant_type"] == "fp4" and rec["relearn"]["settings"]["fraction"] == 0.5
    assert cell("relearn.lr=none").dir.name == plain.dir.name  # the default, spelled out


@pytest.mark.parametrize("setting, words", [
    ("relearn.epoch=3", ["has no setting 'epoch'", "did you mean 'epochs'"]),
    ("quant8.threshold=1", ["attack 'quant8' is not in --attacks"]),
    ("relearn.epochs=two", ["epochs must be a whole number", "'two'"]),
    ("relearn.fraction=1.5", ["fraction must be between 0 and 1"]),
    ("quant4.quant_type=int8", ["use one of nf4, fp4"]),
    ("quant4.block_size=100", ["block_size must be one of 32, 64"]),
    ("relearn.lr=nan", ["lr must be a finite number"]),
    ("relearn.lr=-1", ["lr must be positive"]),
    ("relearn=3", ["expected ATTACK.FIELD=VALUE"]),
])
def test_bad_attack_setting_is_one_line_before_anything_runs(tasks_dir, tmp_path, setting, words):
    rc, _, err = run_cli("run", "-t", NAME, "--include-tasks", tasks_dir, "-m", "grad_diff", "--model", "tiny:full",
                         "--attacks", "quant4,relearn", "--attack-set", setting, "-o", tmp_path, "--dry-run", check=False)
    lines = err.strip().splitlines()
    assert rc != 0 and len(lines) == 1 and lines[0].startswith("error: --attack-set "), err
    for w in words:
        assert w in lines[0], err
    assert not any(tmp_path.iterdir())


def test_quant4_runs_a_layer_whose_width_is_not_a_multiple_of_32():
    """The default tiny model's MLP is 344 wide: bitsandbytes' AVX512-BF16 CPU kernel asserted on it
    ("N must be divisible by block_n") at the first scoring forward of the quant4 attack."""
    import torch

    from harness.attacks.quantize import quantize_linear

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(128, 344), torch.nn.SiLU(), torch.nn.Linear(344, 128)).eval()
    x = torch.randn(3, 128)
    with torch.no_grad():
        want = model(x)
        q, count, _, kept = quantize_linear(model, 4)
        got = q(x)
    assert count == 1 and kept == ["2"]  # 344 inputs: not a whole number of 64-weight blocks
    assert not torch.equal(got, want) and torch.allclose(got, want, atol=0.1)
