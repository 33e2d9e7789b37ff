"""The trade-off report of a sweep on a hand-built results tree: the selection rule, the tables, the export
and the plot."""

import csv
import io
import json

import pytest
from conftest import run_cli

from harness.report import pareto

BETTER = {"forget_quality": "higher", "model_utility": "higher", "forget_truth_ratio": "higher",
          "forget_verbmem_ROUGE": "lower", "retain_knowmem_ROUGE": "higher", "forget_knowmem_ROUGE": "lower",
          "privleak": "zero"}


def write_run(root, task, method, config, seed, metrics, hparams=None):
    d = root / "m" / task / method / f"{config}-s{seed}"
    d.mkdir(parents=True)
    data = {"task": task, "method": method, "model": "m", "seed": seed, "partial": False,
            "metrics": {k: {"value": v, "better": BETTER[k], "version": 1} for k, v in metrics.items()}}
    if hparams is not None:
        data["hparams"] = hparams
    (d / "scores.json").write_text(json.dumps(data))
    return d


def tofu(fq, mu):
    return {"forget_quality": fq, "model_utility": mu, "forget_truth_ratio": 0.6}


@pytest.fixture
def tree(tmp_path):
    root = tmp_path / "results"
    write_run(root, "tofu_forget01", "finetuned", "f0000000", 0, tofu(1e-3, 0.60))
    write_run(root, "tofu_forget01", "retain", "r0000000", 0, tofu(1.0, 0.59))
    # NPO, floor 0.9 x 0.60 = 0.54: A forgets best but breaks utility; B is the best that keeps it (2 seeds)
    write_run(root, "tofu_forget01", "npo", "aaaaaaaa", 0, tofu(0.50, 0.50), {"lr": 1e-3, "npo.beta": 0.5})
    write_run(root, "tofu_forget01", "npo", "bbbbbbbb", 0, tofu(0.10, 0.58), {"lr": 5e-4, "npo.beta": 0.5})
    write_run(root, "tofu_forget01", "npo", "bbbbbbbb", 1, tofu(0.30, 0.56), {"lr": 5e-4, "npo.beta": 0.5})
    write_run(root, "tofu_forget01", "npo", "cccccccc", 0, tofu(0.05, 0.70), {"lr": 5e-4, "npo.beta": 0.1})
    # GradDiff: nothing keeps the floor
    write_run(root, "tofu_forget01", "grad_diff", "dddddddd", 0, tofu(0.9, 0.20), {"lr": 1e-3})
    write_run(root, "tofu_forget01", "grad_diff", "eeeeeeee", 0, tofu(0.8, 0.30), {"lr": 5e-4})
    # MUSE: forget_verbmem_ROUGE lower is better, retain_knowmem_ROUGE the utility
    write_run(root, "muse_news", "finetuned", "f1111111", 0,
              {"forget_verbmem_ROUGE": 0.6, "retain_knowmem_ROUGE": 0.5})
    for config, verb, know in (("11111111", 0.10, 0.40), ("22222222", 0.20, 0.47), ("33333333", 0.30, 0.49)):
        write_run(root, "muse_news", "npo", config, 0, {"forget_verbmem_ROUGE": verb, "retain_knowmem_ROUGE": know},
                  {"lr": 1e-5, "epochs": int(config[0])})
    return root


def sweep_rows(text):
    section = text.split("## Sweep: best point per task and method", 1)[1]
    rows = [ln.strip("|").split("|") for ln in section.splitlines() if ln.startswith("|")][2:]
    return {(r[0].strip(), r[1].strip()): [c.strip() for c in r] for r in rows}


def test_default_rule_best_forgetting_above_the_utility_floor(tree):
    _, text, _ = run_cli("report", tree)
    rows = sweep_rows(text)
    npo = rows[("tofu_forget01", "NPO")]
    assert npo[2:8] == ["3", "bbbbbbbb", "lr=0.0005, npo.beta=0.5", "forget_quality 2.00e-01", "model_utility 5.70e-01",
                        "5.40e-01"]
    assert rows[("tofu_forget01", "GradDiff")][3].startswith("none: no point keeps model_utility >= 0.54")
    muse = rows[("muse_news", "NPO")]
    assert muse[3:6] == ["22222222", "epochs=2", "forget_verbmem_ROUGE 2.00e-01"]  # 0.40 < 0.45: A is out
    # the published-layout table shows the selected point (seed mean of B), and says so
    table = text.split("## TOFU · m", 1)[1]
    npo_row = next(ln for ln in table.splitlines() if ln.startswith("| NPO |"))
    assert "2.00e-01 ± 1.41e-01" in npo_row and "5.70e-01" in npo_row
    assert "showing configuration bbbbbbbb, best of 3 sweep points" in text


def test_fraction_and_best_change_the_choice(tree):
    rows = sweep_rows(run_cli("report", tree, "--utility-fraction", "0")[1])
    assert rows[("tofu_forget01", "NPO")][3] == "aaaaaaaa" and rows[("tofu_forget01", "GradDiff")][3] == "dddddddd"
    rows = sweep_rows(run_cli("report", tree, "--best", "model_utility")[1])
    assert rows[("tofu_forget01", "NPO")][3] == "cccccccc"
    rc, _, err = run_cli("report", tree, "--best", "forget_qualty", check=False)
    assert rc == 2 and "--best forget_qualty: no run reports that metric" in err


def test_without_a_finetuned_row_nothing_is_selected(tree):
    import shutil

    shutil.rmtree(tree / "m" / "tofu_forget01" / "finetuned")
    rows = sweep_rows(run_cli("report", tree)[1])
    assert "no Finetuned row with model_utility" in rows[("tofu_forget01", "NPO")][3]


def test_export_csv_and_json(tree, tmp_path):
    run_cli("report", tree, "--export", tmp_path / "best.csv")
    rows = list(csv.DictReader(io.StringIO((tmp_path / "best.csv").read_text())))
    npo = next(r for r in rows if r["task"] == "tofu_forget01" and r["method"] == "NPO")
    assert (npo["config"], npo["hparams"], npo["seeds"]) == ("bbbbbbbb", "lr=0.0005; npo.beta=0.5", "0,1")
    assert float(npo["objective_value"]) == pytest.approx(0.2) and float(npo["utility_floor"]) == pytest.approx(0.54)
    run_cli("report", tree, "--export", tmp_path / "best.json")
    data = json.loads((tmp_path / "best.json").read_text())
    gd = next(r for r in data if r["task"] == "tofu_forget01" and r["method"] == "GradDiff")
    assert gd["config"] is None and "no point keeps" in gd["note"]
    assert next(r for r in data if r["task"] == "muse_news")["hparams"] == {"epochs": 2}
    doc = json.loads(run_cli("report", tree, "--format", "json")[1])
    assert [r["config"] for r in doc["sweep"] if r["method"] == "NPO"] == ["22222222", "bbbbbbbb"]


def test_plot_draws_the_fronts(tree, tmp_path):
    _, out, _ = run_cli("report", tree, "--plot", tmp_path / "fronts.png")
    png = (tmp_path / "fronts.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000 and "plot written" in out


def test_pareto_front():
    pts = [(0.5, 0.5), (0.58, 0.1), (0.7, 0.05), (0.55, 0.05), (0.2, 0.9)]
    assert pareto(pts, "higher", "higher") == [(0.2, 0.9), (0.5, 0.5), (0.58, 0.1), (0.7, 0.05)]
    # MUSE: low forget_verbmem_ROUGE, high retain_knowmem_ROUGE
    assert pareto([(0.4, 0.1), (0.47, 0.2), (0.45, 0.3), (0.49, 0.3)], "higher", "lower") == [
        (0.4, 0.1), (0.47, 0.2), (0.49, 0.3)]


def test_a_utility_of_zero_meets_a_floor_of_zero(tmp_path):
    """A collapsed Finetuned utility (0, e.g. --limit on the test-size model) puts the floor at 0, which 0 meets."""
    root = tmp_path / "r"
    write_run(root, "tofu_forget01", "finetuned", "f0000000", 0, tofu(0.5, 0.0))
    write_run(root, "tofu_forget01", "npo", "aaaaaaaa", 0, tofu(0.7, 0.0), {"lr": 1e-3})
    write_run(root, "tofu_forget01", "npo", "bbbbbbbb", 0, tofu(1.0, 0.0), {"lr": 5e-4})
    assert sweep_rows(run_cli("report", root)[1])[("tofu_forget01", "NPO")][3:5] == ["bbbbbbbb", "lr=0.0005"]
