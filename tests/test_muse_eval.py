"""MUSE end to end on the embedded tiny News models: eval writes both result layouts, a run cell
unlearns on the bundled data (tiny retain fallback), and MUSE-Books fails fast offline."""

import json
import logging
from pathlib import Path

import numpy as np
import pytest
import torch
from harness_test_helpers import run_cli

from harness import HarnessError
from harness.data.encode import encode_text
from harness.io import read_jsonl
from harness.metrics.mia import min_k_score, privleak_value
from harness.metrics.rouge import rouge_scores
from harness.paths import bundled_dir

PUBLISHED = ("forget_knowmem_ROUGE", "forget_verbmem_ROUGE", "privleak", "retain_knowmem_ROUGE")
TOP = (*PUBLISHED, "extraction_strength")
LIMIT = 6


def _news(sub, split):
    return read_jsonl(bundled_dir() / "muse_news" / sub / f"{split}.jsonl")


@pytest.fixture(scope="module")
def muse_eval(tmp_path_factory):
    out = tmp_path_factory.mktemp("muse_eval")
    rc, stdout, stderr = run_cli("eval", "-t", "muse_news", "--model", "tiny:muse_news_target",
                                 "--reference", "tiny:muse_news_retrain", "--limit", LIMIT, "-o", out)
    (d,) = [p.parent for p in out.rglob("scores.json")]
    return d, stdout


def test_eval_prints_and_writes_the_published_columns(muse_eval):
    d, stdout = muse_eval
    for name in PUBLISHED:
        assert name in stdout
    scores = json.loads((d / "scores.json").read_text())
    assert scores["partial"] is True and scores["task"] == "muse_news"
    top = {n for n, m in scores["metrics"].items() if m["top_level"]}
    assert top == set(TOP)
    assert "mia_min_k" in scores["metrics"]  # the dependency of privleak is kept
    summary = json.loads((d / "MUSE_SUMMARY.json").read_text())
    assert list(summary) == sorted(TOP)
    for name in TOP:
        assert summary[name] == scores["metrics"][name]["value"]
    for name in ("forget_knowmem_ROUGE", "forget_verbmem_ROUGE", "retain_knowmem_ROUGE", "extraction_strength"):
        assert 0.0 <= summary[name] <= 1.0


def test_eval_log_layout_and_recomputed_values(muse_eval):
    d, _ = muse_eval
    raw = (d / "MUSE_EVAL.json").read_text()
    log = json.loads(raw)
    assert list(log) == sorted(log)
    # ROUGE entries: the reference's per-sample fields, rougeL F1 as the aggregate
    for name in ("forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE"):
        vbi = log[name]["value_by_index"]
        assert sorted(vbi, key=int) == [str(i) for i in range(LIMIT)]
        for v in vbi.values():
            assert set(v) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
            assert v["rougeL_f1"] == rouge_scores(v["ground_truth"], v["generation"])["rougeL_f1"]
        assert log[name]["agg_value"] == pytest.approx(np.mean([v["rougeL_f1"] for v in vbi.values()]))
    # verbmem: the target is the whole gt passage
    gts = [r["gt"].strip() for r in _news("verbmem", "forget")[:LIMIT]]
    got = [log["forget_verbmem_ROUGE"]["value_by_index"][str(i)]["ground_truth"] for i in range(LIMIT)]
    assert sum(a == b for a, b in zip(got, gts)) >= LIMIT - 1  # decode clean-up may touch a stray " ."
    # Min-k on the privleak texts; privleak against the reference model's logged AUC
    mk = log["mia_min_k"]
    assert len(mk["forget"]["value_by_index"]) == len(mk["holdout"]["value_by_index"]) == LIMIT
    scores = json.loads((d / "scores.json").read_text())
    ref = json.loads(Path(scores["eval"]["reference"]["path"]).read_text())
    assert log["privleak"]["agg_value"] == pytest.approx(privleak_value(mk["auc"], ref["mia_min_k"]["auc"]), rel=1e-12)
    assert ref["mia_min_k"]["forget"]["value_by_index"]["0"] != mk["forget"]["value_by_index"]["0"]
    assert len(log["extraction_strength"]["value_by_index"]) == LIMIT


def test_min_k_score_of_a_privleak_text_by_hand(muse_eval):
    """Row 0 of privleak/forget: BOS + text cut to 2048 tokens, no eos, Min-40% over all but the last token."""
    from harness.models.load import load_model, load_tokenizer
    from harness.models.tiny import tiny_model_dir

    d, _ = muse_eval
    mk = json.loads((d / "MUSE_EVAL.json").read_text())["mia_min_k"]
    path = str(tiny_model_dir("muse_news_target"))
    tok, model = load_tokenizer(path), load_model(path)
    text = _news("privleak", "forget")[0]["text"]
    ids = tok(text)["input_ids"][:2049]
    assert encode_text(tok, "", text, max_length=2048)["input_ids"] == ids
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    lp = np.array([float(logp[t - 1, ids[t]]) for t in range(1, len(ids) - 1)], dtype=np.float32)
    k = max(1, int(len(lp) * 0.4))
    assert min_k_score(lp, 0.4) == pytest.approx(float(-np.sort(lp)[:k].mean()), rel=1e-6)
    assert mk["forget"]["value_by_index"]["0"]["score"] == pytest.approx(min_k_score(lp, 0.4), rel=1e-4)


# ---------------------------------------------------------------------------- run data
def _tok(kind):
    from harness.models.load import load_tokenizer
    from harness.models.tiny import tiny_model_dir

    return load_tokenizer(str(tiny_model_dir(kind)))


def test_tiny_run_uses_bundled_privleak_retain_texts_and_says_so(caplog):
    from harness.data.items import training_items
    from harness.plugins import get_registry

    task = get_registry().tasks["muse_news"]
    tok = _tok("muse_news_target")
    with caplog.at_level(logging.WARNING, logger="harness"):
        items, rows = training_items(task, tok, None, "retain", None, 3, 256)
    assert rows == _news("privleak", "retain")[:3]
    assert "privleak:retain" in caplog.text and "retain corpus" in caplog.text
    assert all(len(it["input_ids"]) <= 257 and it["labels"][0] == -100 for it in items)
    forget, frows = training_items(task, tok, None, "forget", None, 3, 2048)
    assert frows == _news("raw", "forget")[:3]  # the forget corpus is the real raw/forget
    # BOS + 2048-token chunks fit the tiny MUSE models' declared context
    from harness.models.load import load_model
    from harness.models.tiny import tiny_model_dir

    longest = max(len(it["input_ids"]) for it in forget)
    assert longest == 2049
    assert load_model(str(tiny_model_dir("muse_news_target"))).config.max_position_embeddings >= longest


def test_published_model_run_without_retain1_is_an_error():
    from harness.data import corpus as muse
    from harness.data.items import training_items
    from harness.plugins import get_registry
    from harness.testing import char_tokenizer

    task = get_registry().tasks["muse_news"]
    with pytest.raises(HarnessError, match=r"MUSE-News/raw:retain1.*--data-dir"):
        training_items(task, char_tokenizer(), None, "retain", None, 3, 256)
    err = muse.missing_data_error(task, tiny=False)
    assert "retain (muse-bench/MUSE-News/raw:retain1)" in str(err)
    assert muse.missing_data_error(task, tiny=True) is None


def test_retain1_from_data_dir_is_used_when_given(tmp_path):
    from harness.data import corpus as muse
    from harness.plugins import get_registry

    task = get_registry().tasks["muse_news"]
    (tmp_path / "raw").mkdir()
    (tmp_path / "raw" / "retain1.jsonl").write_text('{"text": "A retain document."}\n')
    rows = muse.corpus_rows(task, "retain", tmp_path, tiny=True)
    assert rows == [{"text": "A retain document."}]


def test_muse_books_offline_fails_fast_naming_the_splits(tmp_path):
    from harness.data import corpus as muse
    from harness.plugins import get_registry

    rc, out, err = run_cli("run", "-t", "muse_books", "-m", "npo", "-o", tmp_path, check=False)
    assert rc == 2
    for split in ("raw:forget", "raw:retain1", "knowmem:forget_qa", "verbmem:forget", "privleak:holdout"):
        assert f"muse-bench/MUSE-Books/{split}" in err
    assert "--data-dir" in err and "hub" in err
    assert not list(tmp_path.rglob("*"))  # nothing was started
    msg = str(muse.missing_data_error(get_registry().tasks["muse_books"], tiny=True))
    assert "<subset>/<split>.jsonl" in msg and "MUSE-Books/raw:forget" in msg
