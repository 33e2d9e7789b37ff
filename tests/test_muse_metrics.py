"""MUSE metrics on hand-computed inputs, and recomputed from the published MUSE-News target log.

tests/data/muse holds a trimmed copy of open-unlearning's ``muse_Llama-2-7b-hf_News_target/MUSE_EVAL.json``
(per-sample Min-k scores, knowmem/verbmem ground truths and generations, the 10-shot prompt of
forget_qa row 0) and the two numbers needed from the Books target summary; the retrain logs are the
shipped ones in harness/bundled/reference_logs.
"""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from harness.data.encode import encode_qa, encode_text
from harness.metrics.mia import mia_auc, min_k_score, privleak_value
from harness.metrics.muse import KNOWMEM_STOP, knowmem_source, rouge_aggregate, verbmem_source
from harness.metrics.rouge import cut_generation, rouge_scores
from harness.models.profiles import get_profiles
from harness.plugins import get_registry
from harness.scoring.context import EvalContext
from harness.scoring.primitives import forward_stats
from harness.scoring.reference import bundled_log, load_log

DATA = Path(__file__).parent / "data" / "muse"
NEWS_TARGET = json.loads((DATA / "muse_Llama-2-7b-hf_News_target_MUSE_EVAL.json").read_text())
BOOKS_TARGET = json.loads((DATA / "muse_Llama-2-7b-hf_Books_target_MUSE_SUMMARY.json").read_text())


@pytest.fixture(scope="module")
def muse_task():
    return get_registry().tasks["muse_news"]


@pytest.fixture(scope="module")
def tiny_tok():
    from harness.models.load import load_tokenizer
    from harness.models.tiny import tiny_model_dir

    return load_tokenizer(str(tiny_model_dir("base")))


# ------------------------------------------------------------------ Min-k, AUC, privleak
def test_min_k_by_hand():
    lp = [-1.0, -5.0, -2.0, -7.0, -3.0]
    assert min_k_score(lp, 0.4) == pytest.approx(6.0)  # int(5*0.4)=2 smallest: -7, -5
    assert min_k_score([-1.0, -4.0], 0.4) == pytest.approx(4.0)  # int(0.8)=0 -> max(1, .) = 1
    assert min_k_score([], 0.4) == 0.0


def test_min_k_uses_every_text_token_but_the_last():
    """MUSE MIA item: BOS + text, no eos; P2 drops the last labelled token (spec 6.4)."""
    from harness.testing import char_tokenizer, tiny_llama

    tok = char_tokenizer()
    model = tiny_llama(tok).eval()
    text = "The river rose overnight."
    item = encode_text(tok, "", text, max_length=2048)
    ids = item["input_ids"]
    assert ids[0] == tok.bos_token_id and ids[-1] != tok.eos_token_id and len(ids) == len(text) + 1
    assert item["labels"][0] == -100 and item["labels"][1:] == ids[1:]
    (stats,) = forward_stats(model, [item], tok.pad_token_id, batch_size=1)
    with torch.no_grad():
        logp = model(input_ids=torch.tensor([ids])).logits[0].float().log_softmax(-1)
    # tokens 1 .. T-2 (the last text token T-1 is dropped), each predicted from the row before it
    by_hand = np.array([float(logp[t - 1, ids[t]]) for t in range(1, len(ids) - 1)], dtype=np.float32)
    assert len(stats.lp) == len(text) - 1
    np.testing.assert_allclose(stats.lp, by_hand, rtol=1e-5, atol=1e-6)
    n = int((len(text) - 1) * 0.4)
    assert min_k_score(stats.lp, 0.4) == pytest.approx(-np.sort(by_hand)[:n].mean(), rel=1e-5)
    # text truncated to max_length tokens after BOS
    short = encode_text(tok, "", text, max_length=10)
    assert short["input_ids"] == ids[:11]


def test_auc_orientation_and_privleak_sign():
    # memorised forget set: low loss-like scores on forget (label 0) -> AUC 1
    assert mia_auc([0.1, 0.2], [0.9, 1.0]) == 1.0
    assert mia_auc([0.9, 1.0], [0.1, 0.2]) == 0.0
    # ties count one half: pairs (1,2) (1,3) (2,2)=1/2 (2,3) -> 3.5/4
    assert mia_auc([1.0, 2.0], [2.0, 3.0]) == pytest.approx(0.875)
    # privleak = ((1-AUC) - (1-AUC_ref)) / (1-AUC_ref) * 100: memorised model -> -100, retain-like -> 0
    assert privleak_value(1.0, 0.5) == pytest.approx(-100.0)
    assert privleak_value(0.5, 0.5) == pytest.approx(0.0)
    assert privleak_value(0.3, 0.5) == pytest.approx(40.0)
    # MUSE's original formula on its own AUC convention (AUC_MUSE = 1 - AUC_OU) gives the same number
    auc_ou, ref_ou = 0.8, 0.4772
    auc_muse, ref_muse = 1 - auc_ou, 1 - ref_ou
    assert privleak_value(auc_ou, ref_ou) == pytest.approx((auc_muse - ref_muse) / ref_muse * 100)


def test_privleak_recomputed_from_published_news_logs():
    """Per-sample Min-k scores of the News target -> AUC; against the shipped retrain log -> privleak."""
    mk = NEWS_TARGET["mia_min_k"]
    f = [v["score"] for _, v in sorted(mk["forget"]["value_by_index"].items(), key=lambda kv: int(kv[0]))]
    h = [v["score"] for _, v in sorted(mk["holdout"]["value_by_index"].items(), key=lambda kv: int(kv[0]))]
    assert len(f) == len(h) == 100
    auc = mia_auc(f, h)
    assert auc == mk["auc"] == mk["agg_value"]
    assert float(np.mean(np.asarray(f, dtype=np.float32))) == pytest.approx(mk["forget"]["agg_value"], rel=1e-6)
    retrain = load_log(bundled_log("muse_Llama-2-7b-hf_News_retrain/MUSE_EVAL.json"))
    assert retrain.auc("mia_min_k") == 0.5236000000000001
    value = privleak_value(auc, retrain.auc("mia_min_k"))
    assert value == pytest.approx(NEWS_TARGET["privleak"]["agg_value"], rel=1e-12)
    assert round(value, 2) == -99.81  # docs/repro.md MUSE News "Finetuned" privleak


def test_privleak_recomputed_from_published_books_summaries():
    retrain = load_log(bundled_log("muse_Llama-2-7b-hf_Books_retrain/MUSE_SUMMARY.json"))
    assert retrain.kind == "summary"
    value = privleak_value(BOOKS_TARGET["mia_min_k"], retrain.auc("mia_min_k"))
    assert value == pytest.approx(BOOKS_TARGET["privleak"], rel=1e-9)
    assert round(value, 2) == -57.34  # community/leaderboard.md Books Finetuned


# --------------------------------------------------------------------------------- ROUGE
def test_rouge_l_f1_with_stemming_on_a_known_pair():
    # stems: the cat were run quickli / the cat run quick -> LCS "the cat run" = 3; P = 3/4, R = 3/5
    s = rouge_scores("The cats were running quickly", "the cat runs quick")
    assert s["rougeL_f1"] == pytest.approx(2 * 0.75 * 0.6 / (0.75 + 0.6))
    assert s["rougeL_recall"] == pytest.approx(0.6)
    assert s["rouge1_recall"] == pytest.approx(0.6)
    agg = rouge_aggregate([{"ground_truth": "The cats were running quickly", "generation": "the cat runs quick"},
                           {"ground_truth": "1472", "generation": "1472"}])
    assert agg.value == pytest.approx((2 / 3 + 1.0) / 2)
    assert agg.per_sample[1]["rougeL_f1"] == 1.0 and agg.per_sample[1]["generation"] == "1472"
    with pytest.raises(Exception, match="rouge_type"):
        rouge_aggregate([], "rouge2")


def test_knowmem_stop_strings_cut_at_the_earliest():
    assert cut_generation(" 1472\n\nQuestion: next", ["</s>", *KNOWMEM_STOP]) == "1472"
    assert cut_generation("Edilnord\nQuestion: x", ["</s>", *KNOWMEM_STOP]) == "Edilnord"
    assert cut_generation("Sarah Bentley</s>junk", ["</s>", *KNOWMEM_STOP]) == "Sarah Bentley"


@pytest.mark.parametrize("name", ["forget_knowmem_ROUGE", "retain_knowmem_ROUGE", "forget_verbmem_ROUGE"])
def test_rouge_recomputed_from_published_news_log(name):
    """Every per-sample score and the aggregate of the Llama-2-7b News target, from its logged strings."""
    entry = NEWS_TARGET[name]
    rows = [entry["value_by_index"][k] for k in sorted(entry["value_by_index"], key=int)]
    assert len(rows) == 100
    agg = rouge_aggregate([{"ground_truth": r["ground_truth"], "generation": r["generation"]} for r in rows])
    for i, r in enumerate(rows):
        for key in ("rouge1_recall", "rougeL_f1", "rougeL_recall"):
            assert agg.per_sample[i][key] == r[key], (name, i, key)
    assert agg.value == pytest.approx(entry["agg_value"], rel=1e-12)


# ------------------------------------------------------------------------- prompts
def test_knowmem_prompt_two_shot_on_llama2_template(tiny_tok):
    template = get_profiles()["llama2-7b"].template
    shots = [("Who won?", "Kyren Wilson"), ("What year did it open?", "1987")]
    item = encode_qa(tiny_tok, template, "Where is Causeway Hospital", "Coleraine", fewshot=shots,
                     max_length=512, generate=True)
    assert item["input_ids"][0] == tiny_tok.bos_token_id
    text = tiny_tok.decode(item["input_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert text == ("Question: Who won?\nAnswer: Kyren Wilson\n\n"
                    "Question: What year did it open?\nAnswer: 1987\n\n"
                    "Question: Where is Causeway Hospital\nAnswer: ")
    # generation labels are the whole conversation plus eos (the ground truth is recovered from them)
    full = tiny_tok.decode(item["labels"], skip_special_tokens=True)
    assert full == text + "Coleraine" and item["labels"][-1] == tiny_tok.eos_token_id


def test_knowmem_source_gives_the_published_ten_shot_prompt(muse_task, tiny_tok):
    """forget_qa row 0 with all rows of forget_qa_icl equals the prompt in the published log."""
    template = get_profiles()["llama2-7b"].template
    ctx = EvalContext(muse_task, None, tiny_tok, template)
    src = knowmem_source(ctx, "forget")
    assert (src.role, src.fewshot, src.max_length, src.kind) == ("forget_knowmem", "forget_knowmem_icl", 512, "qa")
    shots = [(r[src.prompt], r[src.field]) for r in ctx.rows_all(src.fewshot)]
    assert len(shots) == 10
    row = ctx.rows(src.role)[0]
    # the tiny tokenizer needs more than Llama's 512 tokens for this prompt: check the string untruncated
    item = encode_qa(tiny_tok, template, row[src.prompt], row[src.field], fewshot=shots, max_length=100_000,
                     generate=True)
    text = tiny_tok.decode(item["input_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=True)
    assert text == NEWS_TARGET["forget_knowmem_ROUGE"]["value_by_index"]["0"]["input"]


def test_verbmem_source_is_prompt_space_gt(muse_task, tiny_tok):
    ctx = EvalContext(muse_task, None, tiny_tok, get_profiles()["llama2-7b"].template)
    src = verbmem_source(ctx)
    assert (src.role, src.prompt, src.field, src.insert_space, src.max_length) == ("verbmem", "prompt", "gt", True, 2048)
    row = ctx.rows("verbmem")[0]
    item = encode_text(tiny_tok, row["prompt"], row["gt"], max_length=2048, insert_space=True, generate=True)
    assert item["input_ids"] == tiny_tok(row["prompt"])["input_ids"]
    gt = tiny_tok.decode([t for t in item["labels"] if t != -100], skip_special_tokens=True)
    assert gt.strip() == row["gt"].strip()


def test_muse_metrics_registered_once_with_directions():
    reg = get_registry()
    expect = {"forget_knowmem_ROUGE": "lower", "retain_knowmem_ROUGE": "higher", "forget_verbmem_ROUGE": "lower",
              "privleak": "zero", "mia_min_k": "lower", "extraction_strength": "lower"}
    for name, better in expect.items():
        assert reg.metrics[name].better == better
    assert reg.metrics["privleak"].needs_reference
    assert reg.sources[("metrics", "forget_knowmem_ROUGE")].endswith("harness.metrics.muse")
