"""Scoring during training (--eval-every), keeping the best step (--keep-best) and `harness report --curves`:
flag checks, the loop's guarantees on a tiny Llama (training unchanged, best weights restored), and a real
run on the test-size tiny model whose logged values equal a separate `harness eval` of the saved model."""

import json
import math
import re

import pytest
import torch
from conftest import cheap_task_yaml, run_cli

from harness import HarnessError
from harness.cli import parse_options
from harness.options import eval_every_value, keep_best_parts
from harness.training.periodic import PeriodicEval, interval, is_better

TASK = cheap_task_yaml("t17_curves", "forget01 with one cheap metric, for the --eval-every tests")
RUN = ["run", "-t", "tofu_forget01", "-m", "npo"]


# ------------------------------------------------------------------------------------------------ flags
@pytest.mark.parametrize("extra, needle", [
    (["--eval-every", "0"], "--eval-every must be positive, got 0"),
    (["--eval-every=-3"], "--eval-every must be positive, got -3"),
    (["--eval-every", "1.5"], "--eval-every 1.5: a fraction of an epoch must be below 1"),
    (["--eval-every", "often"], "--eval-every 'often': give optimizer steps (e.g. 10) or a fraction"),
    (["--keep-best", "forget_Q_A_Prob"], "--keep-best needs --eval-every N"),
    (["--eval-metrics", "forget_Q_A_Prob"], "--eval-metrics needs --eval-every N"),
    (["--eval-every", "2", "--keep-best", "best:forget_Q_A_Prob"], "the prefix is min: or max:, not best:"),
    (["--eval-every", "2", "--keep-best", "min:"], "--keep-best 'min:': name a metric"),
    (["--eval-every", "2", "--eval-metrics", "a,a"], "--eval-metrics 'a,a': a given more than once"),
])
def test_bad_flag_values_are_one_line_errors(extra, needle):
    with pytest.raises(HarnessError, match=re.escape(needle)):
        parse_options([*RUN, *extra])


def test_flag_values_and_schedule():
    assert eval_every_value("10") == 10 and isinstance(eval_every_value("10"), int)
    assert eval_every_value("0.25") == 0.25
    assert keep_best_parts("forget_Q_A_Prob") == (None, "forget_Q_A_Prob")
    assert keep_best_parts("max:forget_quality") == ("max", "forget_quality")
    assert [interval(4, 10), interval(0.25, 12), interval(0.01, 10)] == [4, 3, 1]
    ev = PeriodicEval(3, lambda m: {})
    ev._interval, ev._last = 3, 10
    assert ev.steps() == [0, 3, 6, 9, 10]  # the last step is always scored
    assert [s for s in range(11) if ev.due(s)] == [3, 6, 9, 10]
    assert is_better(1.0, 2.0, "min") and is_better(3.0, 2.0, "max") and not is_better(2.0, 2.0, "min")
    assert is_better(-0.5, 1.0, "zero") and is_better(0.9, 1.2, "one") and not is_better(float("nan"), 1.0, "max")


def _registry(tmp_path):
    from harness.plugins import get_registry

    tasks = tmp_path / "tasks"
    tasks.mkdir(exist_ok=True)
    (tasks / "t17_curves.yaml").write_text(TASK)
    return tasks, get_registry(include_tasks=[str(tasks)])


def _cell(tmp_path, *extra):
    from harness.commands import run as runner

    tasks, reg = _registry(tmp_path)
    opts = parse_options(["run", "-t", "t17_curves", "-m", "npo", "--model", "tiny:full", "--include-tasks", tasks,
                          "-o", tmp_path / "res", *extra])
    (cell,) = runner.expand(opts, reg)
    return cell


def test_metric_names_are_checked_and_only_keep_best_enters_the_hash(tmp_path):
    with pytest.raises(HarnessError, match=re.escape("--eval-metrics: unknown metric 'forget_Q_A_Prb' (did you "
                                                     "mean 'forget_Q_A_Prob'")):
        _cell(tmp_path, "--eval-every", "2", "--eval-metrics", "forget_Q_A_Prb")
    with pytest.raises(HarnessError, match=re.escape("--keep-best: unknown metric 'forget_truth_ratoi'")):
        _cell(tmp_path, "--eval-every", "2", "--eval-metrics", "forget_Q_A_Prob", "--keep-best", "forget_truth_ratoi")
    # tiny:full names no reference: the task's default subset holds forget_quality, which needs one
    with pytest.raises(HarnessError, match="forget_quality"):
        _cell(tmp_path, "--eval-every", "2")
    plain = _cell(tmp_path)
    watched = _cell(tmp_path, "--eval-every", "2", "--eval-metrics", "forget_Q_A_Prob")
    assert watched.dir == plain.dir and watched.during == {"eval_every": 2, "eval_metrics": ["forget_Q_A_Prob"]}
    best = _cell(tmp_path, "--eval-every", "0.5", "--eval-metrics", "forget_truth_ratio", "--keep-best", "forget_Q_A_Prob")
    assert best.dir != plain.dir
    # the keep-best metric joins the subset; its direction is the metric's declared one (lower is better)
    assert best.config["during_training"] == {"eval_every": 0.5, "eval_metrics": ["forget_truth_ratio", "forget_Q_A_Prob"],
                                              "keep_best": {"metric": "forget_Q_A_Prob", "direction": "min"}}
    flipped = _cell(tmp_path, "--eval-every", "0.5", "--eval-metrics", "forget_truth_ratio", "--keep-best",
                    "max:forget_Q_A_Prob")
    assert flipped.dir != best.dir and flipped.during["keep_best"]["direction"] == "max"


# ------------------------------------------------------------------------------ the loop's guarantees
def test_scoring_leaves_training_unchanged_and_keep_best_restores_that_step(tok, tmp_path):
    from harness.io import read_jsonl
    from harness.plugins import get_registry
    from harness.testing import tiny_llama, toy_data
    from harness.training import TrainConfig, unlearn

    forget, retain, _ = toy_data(tok)
    # 4 forget rows, 2 per step: 2 steps an epoch, 4 in all
    cfg = TrainConfig(epochs=2, lr=1e-2, batch_size=2, per_device_batch=1, warmup_epochs=0, optimizer="adamw_torch")
    npo = get_registry().methods["npo"]
    alone = unlearn(tiny_llama(tok), tok, npo(), forget, retain, cfg, out_dir=tmp_path / "alone")
    seen = []
    values = iter([0.0, 5.0, 2.0, 3.0, 4.0])  # step 0 is lowest but no candidate

    def score(model):
        seen.append((model.training, {n: p.detach().clone() for n, p in model.named_parameters()}))
        torch.rand(1000)  # scoring that draws from the global RNG must not shift training's draws
        return {"m": next(values), "other": 1.0}

    ev = PeriodicEval(1, score, ("m", "min"))
    kept = unlearn(tiny_llama(tok), tok, npo(), forget, retain, cfg, out_dir=tmp_path / "kept", evaluator=ev)
    rows = read_jsonl(tmp_path / "kept" / "train_log.jsonl")
    assert [r["step"] for r in rows if "eval/m" in r] == [0, 1, 2, 3, 4] == ev.steps()
    assert [r["eval/m"] for r in rows if "eval/m" in r] == [0.0, 5.0, 2.0, 3.0, 4.0]
    assert [r.get("eval/best_step") for r in rows if "eval/m" in r] == [None, 1, 2, 2, 2]
    assert not any(training for training, _ in seen)  # scored in eval mode ...
    train = [{k: v for k, v in r.items() if not k.startswith("eval")} for r in rows if r["step"] > 0]
    assert train == read_jsonl(tmp_path / "alone" / "train_log.jsonl")  # ... and training is as without scoring
    final_alone = dict(alone.model.named_parameters())
    assert all(torch.equal(p, final_alone[n]) for n, p in seen[-1][1].items())  # step 4 = the unscored run's end
    assert kept.info["during_training"]["keep_best"] == {"metric": "m", "direction": "min", "step": 2, "epoch": 1.0,
                                                         "value": 2.0}
    best_weights = seen[2][1]
    assert all(torch.equal(p, best_weights[n]) for n, p in kept.model.named_parameters())
    assert not all(torch.equal(p, final_alone[n]) for n, p in kept.model.named_parameters())
    assert not kept.model.training


# -------------------------------------------------------------------------------- a real run, and eval
@pytest.mark.slow
def test_run_logs_scores_keeps_the_best_step_and_plots_curves(tmp_path, tiny_full_dir):
    tasks, _ = _registry(tmp_path)
    out = tmp_path / "res"
    common = ["-t", "t17_curves", "--include-tasks", tasks, "--limit", "6", "--eval-batch-size", "8"]
    # 6 forget rows, batch 2: 3 steps; warm-up makes step 1's learning rate 0, so max: keeps step 1 (start
    # weights: the largest forget probability) and the final model is put back to it
    run_cli("run", *common, "-m", "npo", "--model", "tiny:full", "-o", out, "--epochs", "1", "--train-batch-size", "2",
            "--per-device-batch", "2", "--eval-every", "1", "--eval-metrics", "forget_Q_A_Prob,forget_truth_ratio",
            "--keep-best", "max:forget_Q_A_Prob", "--save-model")
    (cell,) = (out / "tiny_full" / "t17_curves" / "npo").glob("*-s0")
    rows = [json.loads(line) for line in (cell / "train_log.jsonl").read_text().splitlines()]
    scored = {r["step"]: r for r in rows if "eval/forget_Q_A_Prob" in r}
    assert sorted(scored) == [0, 1, 2, 3]
    assert all(isinstance(r["eval/forget_truth_ratio"], float) for r in scored.values())
    probs = {s: r["eval/forget_Q_A_Prob"] for s, r in scored.items() if s > 0}
    best = max(probs, key=lambda s: (probs[s], -s))
    assert best < 3 and probs[best] > probs[3]
    doc = json.loads((cell / "scores.json").read_text())
    assert doc["keep_best"]["step"] == best and doc["keep_best"]["direction"] == "max"
    assert math.isclose(doc["metrics"]["forget_Q_A_Prob"]["value"], probs[best], rel_tol=1e-6)
    import yaml

    config = yaml.safe_load((cell / "config.yaml").read_text())
    assert config["during_training"]["keep_best"]["metric"] == "forget_Q_A_Prob"
    assert config["plan"]["during_training"]["keep_best"]["step"] == best
    # a separate `harness eval` of the saved (best) checkpoint, prompted as the run was, gives the value
    # logged at that step
    template = tmp_path / "template.yaml"
    template.write_text(yaml.safe_dump({k: v for k, v in config["model"]["template"].items() if v is not None}))
    run_cli("eval", *common, "--model", cell / "model", "--template", template, "-o", tmp_path / "ev", "--name", "kept")
    (ev,) = (tmp_path / "ev").rglob("kept/*/scores.json")
    assert math.isclose(json.loads(ev.read_text())["metrics"]["forget_Q_A_Prob"]["value"], probs[best], rel_tol=1e-6)
    png = tmp_path / "curves.png"
    _, stdout, _ = run_cli("report", out, "--curves", png)
    assert f"training curves written to {png}" in stdout
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000


def test_curves_without_training_logs_is_an_error(tmp_path):
    from harness.report.curves import plot_curves

    with pytest.raises(HarnessError, match="no run here has a train_log.jsonl"):
        plot_curves([], tmp_path / "c.png")


def test_trackers_get_the_scores_under_their_own_names(tmp_path):
    from harness.training.tracking import Trackers

    got = []

    class Recorder:
        def log(self, values, step):
            got.append((step, values))

    trackers = Trackers([], run_name="r", log_dir=tmp_path)
    trackers.trackers = [Recorder()]
    trackers.log_row({"step": 4, "epoch": 1.0, "loss": 2.0, "eval/forget_Q_A_Prob": 0.5, "eval_seconds": 1.5})
    assert got == [(4, {"train/epoch": 1.0, "train/loss": 2.0, "train/eval_seconds": 1.5, "eval/forget_Q_A_Prob": 0.5})]
