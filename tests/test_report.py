"""`harness report` on a synthetic results tree: layout, notation, log10 gaps, seed aggregation, plot."""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time

import pytest

from harness import HarnessError, report
from harness.cli import main as cli_main
from harness.options import ReportOptions

BETTER = {
    "forget_quality": "higher",
    "model_utility": "higher",
    "forget_truth_ratio": "higher",
    "forget_knowmem_ROUGE": "lower",
    "forget_verbmem_ROUGE": "lower",
    "privleak": "zero",
    "retain_knowmem_ROUGE": "higher",
}
TOFU_METHODS = ["finetuned", "retain", "grad_ascent", "grad_diff", "idk_dpo", "npo", "simnpo"]


def write_run(root, model, task, method, seed, metrics, *, config="0123abcd", partial=False, display=None):
    d = root / model / task / method / f"{config}-s{seed}"
    d.mkdir(parents=True, exist_ok=True)
    data = {
        "task": task,
        "method": method,
        "model": model,
        "seed": seed,
        "partial": partial,
        "metrics": {
            k: {"value": v, "better": BETTER.get(k, "higher"), "version": 1} for k, v in metrics.items()
        },
    }
    if display:
        data["method_display"] = display
    (d / "scores.json").write_text(json.dumps(data))
    return d


def tofu(fq, mu, tr):
    return {"forget_quality": fq, "model_utility": mu, "forget_truth_ratio": tr, "forget_Q_A_Prob": 0.5}


@pytest.fixture
def tree(tmp_path):
    """Written in a scrambled method order, so the published row order must come from the report."""
    root = tmp_path / "results"
    for split_i, task in enumerate(["tofu_forget10", "tofu_forget01", "tofu_forget05"]):
        for i, method in enumerate(reversed(TOFU_METHODS)):
            write_run(
                root, "llama2-7b-chat", task, method, 0, tofu(10.0 ** -(i + split_i), 0.5 + i / 100, 0.6)
            )
    # Three seeds of NPO on forget01 (hand-computed: mean 0.3, sample std sqrt(0.07) = 0.264575...).
    for seed, value in [(0, 0.1), (1, 0.2), (2, 0.6)]:
        write_run(root, "llama2-7b-chat", "tofu_forget01", "npo", seed, tofu(value, 0.55, 0.65))
    # A third-party method with a display name, partial.
    write_run(root, "llama2-7b-chat", "tofu_forget01", "my_method", 0, tofu(0.0127, 0.6, 0.7),
              display="MyMethod", partial=True)  # fmt: skip
    for task in ["muse_books", "muse_news"]:
        for method in ["simnpo", "finetuned", "npo", "retain", "grad_diff", "grad_ascent"]:
            write_run(root, "llama2-7b", task, method, 0,
                      {"forget_knowmem_ROUGE": 0.5, "forget_verbmem_ROUGE": 0.25, "privleak": -99.81,
                       "retain_knowmem_ROUGE": 0.555})  # fmt: skip
    return root


def md_table(text: str, heading: str) -> list[list[str]]:
    """The rows (header first, separator dropped) of the first Markdown table after `heading`."""
    lines = text.splitlines()
    start = lines.index(heading)
    rows = []
    for line in lines[start + 1 :]:
        if line.startswith("|"):
            if not line.startswith("|---"):
                rows.append([c.strip() for c in line.strip("|").split("|")])
        elif rows:
            break
    return rows


def render(root, fmt="md", compare=None, model=None):
    tables = report.build_tables(report.build_cells(report.load_runs(root, model)), compare)
    return {"md": report.render_markdown, "html": report.render_html, "csv": report.render_csv}[fmt](
        tables, compare
    )


# ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "value, text",
    [
        (1.27e-03, "1.27e-03"),
        (0.000123456, "1.23e-04"),
        (1.94e-119, "1.94e-119"),
        (1.06e-239, "1.06e-239"),
        (0.0, "0.00e+00"),
        (-99.81, "-9.98e+01"),
        (0.9996, "1.00e+00"),  # rounds up into the next decade
        (52.11, "5.21e+01"),
        (None, "n/a"),
        (float("nan"), "n/a"),
    ],
)
def test_three_significant_digits(value, text):
    assert report.fmt(value) == text


def test_layout_rows_in_published_order_and_column_groups(tree):
    text = render(tree)
    rows = md_table(text, "## TOFU · llama2-7b-chat")
    header, body = rows[0], rows[1:]
    assert [r[0] for r in body] == [
        "Finetuned", "Retain", "GradAscent", "GradDiff", "IdkDPO", "NPO", "SimNPO", "MyMethod",
    ]  # fmt: skip
    assert header == ["method"] + [
        f"{split} {metric} ↑"
        for split in ["forget01", "forget05", "forget10"]
        for metric in ["forget_quality", "model_utility", "forget_truth_ratio"]
    ]
    # GradAscent is written 5th (i=4) of the reversed list: forget10 (split_i 0) FQ = 1e-4, MU = 0.54.
    ga = body[2]
    assert ga[header.index("forget10 forget_quality ↑")] == "1.00e-04"
    assert ga[header.index("forget10 model_utility ↑")] == "5.40e-01"
    assert ga[header.index("forget05 forget_quality ↑")] == "1.00e-06"

    muse = md_table(text, "## MUSE · llama2-7b")
    assert muse[0][1:5] == [
        "News forget_knowmem_ROUGE ↓", "News forget_verbmem_ROUGE ↓", "News privleak →0",
        "News retain_knowmem_ROUGE ↑",
    ]  # fmt: skip
    assert muse[0][5].startswith("Books ")
    assert [r[0] for r in muse[1:]] == ["Finetuned", "Retain", "GradAscent", "GradDiff", "NPO", "SimNPO"]
    assert muse[1][1:5] == ["5.00e-01", "2.50e-01", "-9.98e+01", "5.55e-01"]
    # TOFU tables come before MUSE ones.
    assert text.index("## TOFU") < text.index("## MUSE")


def test_seed_aggregation_mean_and_sample_std(tree):
    cells = {(c.model, c.task, c.method): c for c in report.build_cells(report.load_runs(tree))}
    npo = cells[("llama2-7b-chat", "tofu_forget01", "npo")]
    assert npo.seeds == [0, 1, 2]
    fq = npo.stats["forget_quality"]
    assert fq.n == 3
    assert fq.mean == pytest.approx(0.3, rel=1e-12)
    assert fq.std == pytest.approx(math.sqrt(0.07), rel=1e-12)
    assert npo.stats["model_utility"].std == pytest.approx(0.0, abs=1e-15)
    # One seed: no std.
    assert cells[("llama2-7b-chat", "tofu_forget01", "grad_diff")].stats["forget_quality"].std is None

    rows = md_table(render(tree), "## TOFU · llama2-7b-chat")
    npo_row = next(r for r in rows if r[0] == "NPO")
    assert npo_row[1] == "3.00e-01 ± 2.65e-01"
    assert "mean ± sample std over seeds 0,1,2" in render(tree)


def test_aggregate_skips_null_values_and_counts_them():
    s = report.aggregate([0.2, None, 0.4])
    assert (s.mean, s.n) == (pytest.approx(0.3), 2)
    assert s.std == pytest.approx(math.sqrt(0.02))
    assert report.aggregate([None]).mean is None


def test_fields_missing_from_scores_json_come_from_the_run_folder(tmp_path):
    """`harness eval` writes no method or seed: the layout <model>/<task>/<method>/<hash8>-s<seed> has them."""
    d = tmp_path / "llama2-7b-chat" / "tofu_forget05" / "retain" / "feedbeef-s3"
    d.mkdir(parents=True)
    (d / "scores.json").write_text(
        json.dumps(
            {"task": "tofu_forget05", "model": "llama2-7b-chat", "metrics": {"model_utility": {"value": 0.6}}}
        )
    )
    (run,) = report.load_runs(tmp_path)
    assert (run.method, run.display, run.seed, run.config, run.partial) == (
        "retain",
        "Retain",
        3,
        "feedbeef",
        False,
    )


def test_null_metric_value_shows_na(tmp_path):
    write_run(tmp_path, "m", "tofu_forget01", "npo", 0, tofu(None, 0.5, 0.6))
    rows = md_table(render(tmp_path), "## TOFU · m")
    assert rows[1][1:3] == ["n/a", "5.00e-01"]


@pytest.mark.parametrize(
    "metric, ours, published, expected",
    [
        ("forget_quality", 1.27e-2, 1.27e-3, 1.0),
        ("forget_quality", 1e-5, 1.94e-119, -5 - math.log10(1.94e-119)),
        ("forget_quality", 0.5, 0.0, None),  # published misprint 0 -> n/a, never inf
        ("forget_quality", 0.0, 1e-3, None),
        ("forget_quality", 0.5, None, None),
        ("forget_quality", None, 0.5, None),
        ("model_utility", 0.6, 0.628, 0.6 - 0.628),
        ("model_utility", 0.6, 0.0, 0.6),  # a linear gap to 0 is finite
        ("privleak", -90.0, -99.8, 9.8),
    ],
)
def test_difference(metric, ours, published, expected):
    d = report.difference(metric, ours, published)
    if expected is None:
        assert d is None
    else:
        assert d == pytest.approx(expected, rel=1e-12)


def test_compare_shows_ours_published_and_log10_gap(tree):
    published = report.load_published()
    text = render(tree, compare=published)
    assert "inf" not in text.lower().replace("info", "")
    rows = md_table(text, "### TOFU · llama2-7b-chat vs published Llama-2-7b-chat-hf")
    header = rows[0]
    assert header[:4] == ["method", "forget_quality ours", "published", "Δlog10"]
    assert header[5:7] == ["published", "Δ"]
    by = {r[0]: r for r in rows[1:]}
    # forget01 Finetuned: i=6 in the reversed list, split_i=1 -> FQ 1e-7; published 1.27e-03.
    assert by["Finetuned"][1:4] == ["1.00e-07", "1.27e-03", f"{-7 - math.log10(1.27e-3):+.2f}"]
    assert by["Finetuned"][3] == "-4.10"  # -7 - log10(1.27e-3) = -7 + 2.896
    # model utility 0.56 vs published 0.628: linear gap in 3 significant digits.
    assert by["Finetuned"][4:7] == ["5.60e-01", "6.28e-01", "-6.80e-02"]
    # Retain: published forget_quality printed as 0 -> n/a, not an infinite gap.
    assert by["Retain"][2:4] == ["0.00e+00", "n/a"]
    # NPO over three seeds: mean 0.3 vs published 0.405.
    assert by["NPO"][1:4] == ["3.00e-01 ± 2.65e-01", "4.05e-01", f"{math.log10(0.3 / 0.405):+.2f}"]
    # Not in the published table: published n/a, gap n/a; partial marked.
    assert by["MyMethod"][1:4] == ["1.27e-02*", "n/a", "n/a"]
    # MUSE compare for llama2-7b against Llama-2-7b-hf, privleak as a linear gap.
    muse = md_table(text, "### MUSE · llama2-7b vs published Llama-2-7b-hf")
    fin = next(r for r in muse[1:] if r[0] == "Finetuned")
    assert fin[7:10] == ["-9.98e+01", "-9.98e+01", "-1.00e-02"]  # ours -99.81, published -99.8


def test_compare_csv_long_format(tree):
    published = report.load_published()
    rows = list(csv.DictReader(io.StringIO(render(tree, "csv", published))))
    assert list(rows[0]) == report.CSV_COLUMNS + report.COMPARE_COLUMNS
    npo = next(
        r
        for r in rows
        if r["method"] == "NPO" and r["split"] == "forget01" and r["metric"] == "forget_quality"
    )
    assert (npo["value"], npo["std"], npo["n"], npo["seeds"]) == ("3.00e-01", "2.65e-01", "3", "0 1 2")
    assert (npo["published_model"], npo["published"], npo["diff_kind"]) == (
        "Llama-2-7b-chat-hf",
        "4.05e-01",
        "log10",
    )
    retain = next(
        r
        for r in rows
        if r["method"] == "Retain" and r["split"] == "forget05" and r["metric"] == "forget_quality"
    )
    assert (retain["published"], retain["diff"]) == ("0.00e+00", "n/a")
    partial = [r for r in rows if r["partial"] == "true"]
    assert {r["method"] for r in partial} == {"MyMethod"}
    # 7 TOFU rows x 3 splits x 3 metrics + MyMethod's 3 + MUSE 6 x 2 x 4.
    assert len(rows) == 63 + 3 + 48


def test_csv_without_compare_is_a_valid_compare_source(tree, tmp_path):
    out = tmp_path / "ours.csv"
    out.write_text(render(tree, "csv"))
    again = report.load_published(out)
    assert again[("tofu", "llama2-7b-chat", "NPO", "forget01", "forget_quality")] == pytest.approx(0.3)
    text = render(tree, compare=again)
    rows = md_table(text, "### TOFU · llama2-7b-chat vs published llama2-7b-chat")
    by = {r[0]: r for r in rows[1:]}
    assert by["NPO"][3] == "+0.00"
    assert by["GradDiff"][6] == "+0.00e+00"


def test_published_csvs_shipped_with_the_package():
    published = report.load_published()
    assert len(published) == 63 + 63 + 48
    assert published[("tofu", "Llama-2-7b-chat-hf", "Retain", "forget01", "forget_quality")] == 0.0
    assert published[("tofu", "Llama-3.2-1B-Instruct", "SimNPO", "forget10", "forget_quality")] == 2.47e-203
    assert published[("muse", "Llama-2-7b-hf", "Finetuned", "News", "privleak")] == -99.8
    assert (report.PUBLISHED_DIR / "README.md").is_file()


def test_published_model_mapping():
    published = report.load_published()
    assert report.published_model_names("llama2-7b-chat", "tofu", published) == ["Llama-2-7b-chat-hf"]
    assert report.published_model_names("llama3.2-1b-instruct", "tofu", published) == [
        "Llama-3.2-1B-Instruct"
    ]
    assert report.published_model_names("llama2-7b", "muse", published) == ["Llama-2-7b-hf"]
    hub = "open-unlearning--tofu_Llama-2-7b-chat-hf_full"
    assert report.published_model_names(hub, "tofu", published) == ["Llama-2-7b-chat-hf"]
    # The embedded model has no counterpart: shown against each published model of the benchmark.
    assert report.published_model_names("tiny", "tofu", published) == [
        "Llama-2-7b-chat-hf",
        "Llama-3.2-1B-Instruct",
    ]
    assert report.published_model_names("tiny", "muse", published) == ["Llama-2-7b-hf"]


def test_counterpart_only_for_real_mappings():
    assert report.is_counterpart("llama2-7b", "Llama-2-7b-hf")
    assert report.is_counterpart("open-unlearning__tofu_Llama-2-7b-chat-hf_full", "Llama-2-7b-chat-hf")
    assert not report.is_counterpart("tiny", "Llama-2-7b-hf")
    assert not report.is_counterpart("llama2-7b-chat", "Llama-3.2-1B-Instruct")


def test_partial_marked_and_complete_config_preferred(tmp_path):
    old = write_run(tmp_path, "m", "tofu_forget01", "npo", 0, tofu(0.5, 0.5, 0.5), config="aaaaaaaa")
    write_run(tmp_path, "m", "tofu_forget01", "npo", 0, tofu(0.1, 0.1, 0.1), config="bbbbbbbb", partial=True)
    past = time.time() - 100
    os.utime(old / "scores.json", (past, past))  # the partial one is newer, the complete one still wins
    text = render(tmp_path)
    assert md_table(text, "## TOFU · m")[1][1] == "5.00e-01"
    assert "showing configuration aaaaaaaa; also found bbbbbbbb" in text
    # Among complete configurations the newest wins.
    write_run(tmp_path, "m", "tofu_forget01", "npo", 0, tofu(0.2, 0.2, 0.2), config="cccccccc")
    assert md_table(render(tmp_path), "## TOFU · m")[1][1] == "2.00e-01"
    # Only a partial run: marked with * and explained.
    write_run(tmp_path, "m", "tofu_forget05", "grad_diff", 0, tofu(0.3, 0.3, 0.3), partial=True)
    text = render(tmp_path)
    row = md_table(text, "## TOFU · m")[1]
    assert row[0] == "GradDiff" and row[4] == "3.00e-01*"
    assert "`*` partial result" in text


def test_html_has_grouped_header_and_escapes(tmp_path):
    write_run(tmp_path, "m<x>", "tofu_forget01", "npo", 0, tofu(0.5, 0.5, 0.5))
    write_run(tmp_path, "m<x>", "tofu_forget05", "npo", 0, tofu(0.25, 0.5, 0.5))
    text = render(tmp_path, "html")
    assert text.count('<th colspan="3">') == 2
    assert "m&lt;x&gt;" in text and "m<x>" not in text
    assert "<td>NPO</td><td>5.00e-01</td><td>5.00e-01</td><td>5.00e-01</td><td>2.50e-01</td>" in text


def test_unknown_task_gets_its_own_table(tmp_path):
    write_run(tmp_path, "m", "my_bench", "npo", 0, {"b_metric": 2.0, "a_metric": 1.0})
    rows = md_table(render(tmp_path), "## my_bench · m")
    assert rows[0] == ["method", "my_bench a_metric ↑", "my_bench b_metric ↑"]
    assert rows[1] == ["NPO", "1.00e+00", "2.00e+00"]


def test_model_filter(tree):
    text = render(tree, model="llama2-7b")
    assert "## MUSE · llama2-7b" in text and "TOFU" not in text
    assert "## TOFU · llama2-7b-chat" in render(tree, model="*chat")
    with pytest.raises(HarnessError, match="--model nope"):
        render(tree, model="nope")


def test_errors_are_one_line_and_name_the_file(tmp_path):
    with pytest.raises(HarnessError, match="does not exist"):
        report.load_runs(tmp_path / "missing")
    with pytest.raises(HarnessError, match="no scores.json"):
        report.load_runs(tmp_path)
    bad = tmp_path / "m" / "t" / "x" / "abc-s0"
    bad.mkdir(parents=True)
    (bad / "scores.json").write_text("{not json")
    with pytest.raises(HarnessError, match=r"abc-s0/scores.json: not readable JSON"):
        report.load_runs(tmp_path)
    (bad / "scores.json").write_text(json.dumps({"task": "t", "method": "x", "model": "m"}))
    with pytest.raises(HarnessError, match="field 'metrics' is missing"):
        report.load_runs(tmp_path)
    csv_path = tmp_path / "pub.csv"
    csv_path.write_text("benchmark,model,value\n")
    with pytest.raises(HarnessError, match=r"columns \['method', 'split', 'metric'\] missing"):
        report.load_published(csv_path)


def test_plot_written(tree, tmp_path):
    png = tmp_path / "plots" / "fq_mu.png"
    tables = report.build_tables(report.build_cells(report.load_runs(tree)), report.load_published())
    report.plot(tables, png, report.load_published())
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > 20_000  # two panels with points, legends and labels


def test_cli_report_end_to_end(tree, tmp_path, capsys):
    out = tmp_path / "report.json"
    assert cli_main(["report", str(tree), "--format", "json", "--compare", "-o", str(out)]) == 0
    data = json.loads(out.read_text())
    tofu_table = next(t for t in data["tables"] if t["benchmark"] == "tofu")
    npo = next(r for r in tofu_table["rows"] if r["method"] == "NPO" and r["split"] == "forget01")
    assert npo["metrics"]["forget_quality"]["mean"] == pytest.approx(0.3)
    assert npo["metrics"]["forget_quality"]["values"] == [0.1, 0.2, 0.6]
    assert "forget_Q_A_Prob" in npo["metrics"]  # JSON keeps every metric, not only the headline ones
    comp = tofu_table["comparison"]["Llama-2-7b-chat-hf"]
    retain = next(r for r in comp if r["method"] == "Retain" and r["metric"] == "forget_quality")
    assert retain["published"] == 0.0 and retain["diff"] is None

    assert cli_main(["report", str(tree)]) == 0
    assert "## TOFU · llama2-7b-chat" in capsys.readouterr().out
    assert cli_main(["report", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_main_accepts_namespace_flags(tree, tmp_path):
    """report.main as the CLI calls it: compare given as the flag's constant or a path."""
    out = tmp_path / "r.md"
    args = ReportOptions(results=str(tree), compare="published", output=str(out))
    assert report.main(args) == 0
    assert "vs published Llama-2-7b-chat-hf" in out.read_text()
    args.compare = str(report.PUBLISHED_DIR / "seed_muse_Llama-2-7b-hf.csv")
    report.main(args)
    text = out.read_text()
    assert "vs published Llama-2-7b-hf" in text and "vs published Llama-2-7b-chat-hf" not in text
    assert "_No published numbers for TOFU · llama2-7b-chat._" in text


def test_timing_table_from_recorded_seconds(tmp_path, capsys):
    """--timing: training + scoring seconds per cell, averaged over seeds; one recorded part is labelled."""
    root = tmp_path / "results"
    for seed, (train, score) in enumerate([(10.0, 30.0), (20.0, 50.0)]):
        d = write_run(root, "tiny", "tofu_forget01", "npo", seed, tofu(0.1, 0.5, 0.6))
        doc = json.loads((d / "scores.json").read_text())
        doc.update(train_seconds=train, eval={"seconds": score})
        (d / "scores.json").write_text(json.dumps(doc))
    d = write_run(root, "tiny", "tofu_forget01", "finetuned", 0, tofu(0.01, 0.5, 0.6))
    doc = json.loads((d / "scores.json").read_text())
    doc["eval"] = {"seconds": 12.4}
    (d / "scores.json").write_text(json.dumps(doc))
    write_run(root, "tiny", "tofu_forget05", "npo", 0, tofu(0.1, 0.5, 0.6))  # nothing recorded
    text = report.render_timing(report.build_tables(report.build_cells(report.load_runs(root))))
    rows = md_table(text, "## Wall time (s) · TOFU · tiny")
    assert rows[0] == ["method", "forget01", "forget05"]
    assert rows[1] == ["Finetuned", "12 (scoring)", "-"]
    assert rows[2] == ["NPO", "15 + 40 = 55", "-"]
    assert cli_main(["report", str(root), "--timing"]) == 0
    assert "| NPO | 15 + 40 = 55 | - |" in capsys.readouterr().out
