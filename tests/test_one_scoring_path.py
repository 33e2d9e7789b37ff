"""One resolver, one scoring path: a model scored at the end of ``harness run`` and the same checkpoint
scored again by ``harness eval`` give byte-identical metric values and use the same cached reference."""

import json

from conftest import ROOT, run_cli

from harness.io import write_yaml
from harness.models.profiles import get_profiles

TASK = f"""\
task: t11_paths
include: {ROOT}/tasks/tofu/_base.yaml
description: forget01 with reference-based metrics, for the run/eval seam
data:
  forget: {{path: locuslab/TOFU, name: forget01}}
  retain: {{path: locuslab/TOFU, name: retain99}}
  forget_eval: {{path: locuslab/TOFU, name: forget01_perturbed}}
  holdout: {{path: locuslab/TOFU, name: holdout01}}
metrics: [forget_quality, forget_Q_A_Prob, privleak]
"""


def _metrics(path):
    doc = json.loads(path.read_text())
    return json.dumps({k: v["value"] for k, v in doc["metrics"].items()}), doc["eval"]["reference"]


def test_run_and_eval_score_a_checkpoint_identically(tmp_path):
    tasks = tmp_path / "tasks"
    tasks.mkdir()
    (tasks / "t11_paths.yaml").write_text(TASK)
    common = ["--include-tasks", tasks, "--limit", "4", "--reference", "tiny:retain99"]
    run_cli("run", "-t", "t11_paths", "-m", "grad_ascent", "--model", "tiny:full", "--save-model",
            "-o", tmp_path / "run", *common)
    (cell_scores,) = (tmp_path / "run").glob("tiny_full/t11_paths/grad_ascent/*/scores.json")
    saved = cell_scores.parent / "model"
    template = tmp_path / "tmpl.yaml"
    write_yaml(template, {k: v for k, v in get_profiles()["tiny"].template.to_dict().items() if v is not None})
    run_cli("eval", "-t", "t11_paths", "--model", saved, "--template", template, "-o", tmp_path / "eval", *common)
    (eval_scores,) = (tmp_path / "eval").glob("*/t11_paths/eval/*/scores.json")
    run_values, run_ref = _metrics(cell_scores)
    eval_values, eval_ref = _metrics(eval_scores)
    assert run_values == eval_values
    assert run_ref["kind"] == "model" and run_ref["cache_key"] == eval_ref["cache_key"]
    # the unlearning really moved the model: the same seam on the start model gives other numbers
    (start_scores,) = (tmp_path / "run").glob("tiny_full/t11_paths/finetuned/*/scores.json")
    assert _metrics(start_scores)[0] != run_values
