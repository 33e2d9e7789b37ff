"""End-to-end evaluation of the test-size tiny model, checked against straightforward
per-example computations (unbatched forward passes, a hand-written greedy loop)."""

import copy
import json
import math

import numpy as np
import pytest
import torch

from harness import HarnessError
from harness.data.encode import Template
from harness.metrics import Source
from harness.scoring.context import EvalContext
from harness.scoring.evaluate import evaluate_task

LIMIT = 6
SUITE = ["forget_truth_ratio", "forget_quality", "forget_Q_A_Prob", "forget_Q_A_ROUGE", "model_utility",
         "privleak", "extraction_strength", "exact_memorization", "mia_loss", "mia_zlib",
         "mia_min_k_plus_plus", "mia_gradnorm", "mia_reference"]


@pytest.fixture(scope="module")
def env(tiny_full_dir, tiny_retain99_dir):
    from harness.models.load import load_model, load_tokenizer
    from harness.models.tiny import TINY_TEMPLATE
    from harness.plugins import get_registry

    reg = get_registry()
    return {"reg": reg, "task": reg.tasks["tofu_forget01"], "tok": load_tokenizer(str(tiny_full_dir)),
            "model": load_model(str(tiny_full_dir)), "template": TINY_TEMPLATE,
            "full": tiny_full_dir, "retain": tiny_retain99_dir}


@pytest.fixture(scope="module")
def run(env, tmp_path_factory):
    out = tmp_path_factory.mktemp("eval") / "run"
    scores = evaluate_task(env["task"], env["model"], env["tok"], env["template"], reference=str(env["retain"]),
                           out_dir=out, batch_size=4, limit=LIMIT, metrics=SUITE, progress=False,
                           registry=env["reg"], model_label="tiny_full")
    return scores, out


# ----------------------------------------------------------- independent computation
def _encode(tok, tmpl, q, a):
    """The tiny template by hand: <|user|>q<|assistant|>a</s>; labels start after the prompt."""
    prompt = tmpl.user_start_tag + q + tmpl.user_end_tag + tmpl.asst_start_tag
    ids = tok(prompt + a)["input_ids"]
    if ids[-1] != tok.eos_token_id:
        ids = ids + [tok.eos_token_id]
    return ids, len(tok(prompt)["input_ids"])


def _logprobs(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].float().log_softmax(-1)


def _answer_stats(env, q, a):
    ids, n_prompt = _encode(env["tok"], env["template"], q, a)
    lsm = _logprobs(env["model"], ids)
    lps = [lsm[p - 1, ids[p]].item() for p in range(n_prompt, len(ids))]
    return -sum(lps) / len(lps), lps


def _rows(name, n=LIMIT):
    from harness.paths import bundled_dir

    with open(bundled_dir() / "tofu" / f"{name}.jsonl") as fh:
        return [json.loads(line) for line in fh][:n]


# ------------------------------------------------------------------------ tests
def test_writes_both_layouts(run):
    scores, out = run
    names = {p.name for p in out.iterdir()}
    assert {"scores.json", "samples.jsonl", "TOFU_EVAL.json", "TOFU_SUMMARY.json"} <= names
    text = (out / "TOFU_EVAL.json").read_text()
    log = json.loads(text)
    assert list(log) == sorted(log)
    assert text.startswith('{\n    "')  # indent 4, as open-unlearning writes
    # every dependency is exported, including the nine utility parts and the MIA sub-results
    for key in ("forget_Q_A_PARA_Prob", "forget_Q_A_PERT_Prob", "retain_Q_A_Prob", "retain_Q_A_ROUGE",
                "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE", "ra_Truth_Ratio",
                "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio", "mia_min_k"):
        assert key in log, key
    assert list(log["forget_truth_ratio"]["value_by_index"]) == [str(i) for i in range(LIMIT)]
    assert set(log["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]) == {"prob", "avg_loss"}
    assert len(log["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"]) == 5
    assert set(log["forget_Q_A_ROUGE"]["value_by_index"]["0"]) == {
        "rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
    assert set(log["mia_min_k"]) == {"agg_value", "auc", "forget", "holdout"}
    assert set(log["forget_quality"]) == {"agg_value"}
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert set(summary) == {n for n in SUITE if scores[n].value is not None}
    assert summary["model_utility"] == log["model_utility"]["agg_value"] == scores["model_utility"].value
    doc = json.loads((out / "scores.json").read_text())
    assert doc["task"] == "tofu_forget01" and doc["partial"] is True
    assert doc["eval"]["attention_mask"] == "reference"
    assert doc["eval"]["reference"]["kind"] == "model"
    assert doc["eval"]["seconds"] > 0
    m = doc["metrics"]["forget_quality"]
    assert m["better"] == "higher" and m["version"] == 1 and m["value"] == scores["forget_quality"].value
    assert doc["metrics"]["privleak"]["better"] == "zero"
    rows = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    gens = [r for r in rows if r["metric"] == "forget_Q_A_ROUGE"]
    assert len(gens) == LIMIT and all("generation" in r for r in gens)
    assert len([r for r in rows if r["metric"] == "mia_min_k" and r.get("split") == "holdout"]) == LIMIT


def test_probability_truth_ratio_min_k_match_unbatched(env, run):
    scores, _ = run
    forget = _rows("forget01_perturbed")
    trs, mink_f = [], []
    for i, row in enumerate(forget):
        avg, lps = _answer_stats(env, row["question"], row["answer"])
        got = scores["forget_Q_A_Prob"].per_sample[i]
        assert got["avg_loss"] == pytest.approx(avg, rel=1e-5)
        assert got["prob"] == pytest.approx(math.exp(-avg), rel=1e-5)
        para, _ = _answer_stats(env, row["question"], row["paraphrased_answer"])
        pert = [_answer_stats(env, row["question"], a)[0] for a in row["perturbed_answer"]]
        tr = math.exp(-sum(pert) / len(pert)) / (math.exp(-para) + 1e-10)
        assert scores["forget_truth_ratio"].per_sample[i]["score"] == pytest.approx(tr, rel=1e-5)
        trs.append(tr)
        # min-k: the last labelled token (eos) is dropped, k = 0.4 of the rest, at least one
        body = sorted(lps[:-1])
        mink_f.append(-sum(body[:max(1, int(len(body) * 0.4))]) / max(1, int(len(body) * 0.4)))
    assert scores["forget_truth_ratio"].value == pytest.approx(
        sum(min(t, 1 / (t + 1e-10)) for t in trs) / len(trs), rel=1e-5)
    mink_h = []
    for row in _rows("holdout01"):
        _, lps = _answer_stats(env, row["question"], row["answer"])
        body = sorted(lps[:-1])
        k = max(1, int(len(body) * 0.4))
        mink_h.append(-sum(body[:k]) / k)
    mia = scores["mia_min_k"]
    got_f = [v["score"] for v in mia.extra["forget"]["value_by_index"].values()]
    got_h = [v["score"] for v in mia.extra["holdout"]["value_by_index"].values()]
    assert got_f == pytest.approx(mink_f, rel=1e-5)
    assert got_h == pytest.approx(mink_h, rel=1e-5)
    from sklearn.metrics import roc_auc_score

    assert mia.value == roc_auc_score([0] * LIMIT + [1] * LIMIT, mink_f + mink_h)


def test_rouge_matches_a_hand_written_greedy_loop(env, run):
    from rouge_score import rouge_scorer

    scores, _ = run
    tok, model = env["tok"], env["model"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    same = 0
    for i, row in enumerate(_rows("forget01_perturbed")):
        prompt = env["template"].user_start_tag + row["question"] + env["template"].asst_start_tag
        ids = tok(prompt)["input_ids"]
        new = []
        with torch.no_grad():
            for _ in range(200):
                nxt = int(model(torch.tensor([ids + new])).logits[0, -1].argmax())
                if nxt == tok.eos_token_id:
                    break
                new.append(nxt)
        gen = tok.decode(new, skip_special_tokens=True).strip()
        got = scores["forget_Q_A_ROUGE"].per_sample[i]
        assert got["ground_truth"] == row["answer"].strip()
        if got["generation"] == gen:
            same += 1
            assert got["rougeL_recall"] == scorer.score(row["answer"], gen)["rougeL"].recall
    # batched left-padded greedy decoding may flip at rare near-ties
    assert same >= LIMIT - 1
    vals = [v["rougeL_recall"] for v in scores["forget_Q_A_ROUGE"].per_sample.values()]
    assert scores["forget_Q_A_ROUGE"].value == pytest.approx(np.mean(vals))


def test_forget_quality_and_privleak_use_the_cached_retain_scores(env, run):
    from harness.metrics.mia import privleak_value
    from harness.metrics.tofu import ks_pvalue
    from harness.paths import harness_home

    scores, _ = run
    caches = list((harness_home() / "references").glob("*/TOFU_EVAL.json"))
    assert caches, "the retain model's scores are cached"
    ref = None
    for c in caches:
        doc = json.loads(c.read_text())
        if len(doc.get("forget_truth_ratio", {}).get("value_by_index", {})) == LIMIT:
            ref = doc
    assert ref is not None and "mia_min_k" in ref
    y = [v["score"] for _, v in sorted(ref["forget_truth_ratio"]["value_by_index"].items(), key=lambda kv: int(kv[0]))]
    x = [scores["forget_truth_ratio"].per_sample[i]["score"] for i in range(LIMIT)]
    assert scores["forget_quality"].value == ks_pvalue(x, y)
    assert scores["privleak"].value == privleak_value(scores["mia_min_k"].value, ref["mia_min_k"]["auc"])


def test_sorted_batches_equal_dataset_order(env):
    src = Source("forget_eval", "perturbed_answer")
    a = EvalContext(env["task"], env["model"], env["tok"], env["template"], batch_size=3, limit=LIMIT,
                    progress=False, registry=env["reg"], sort=True).probability(src)
    b = EvalContext(env["task"], env["model"], env["tok"], env["template"], batch_size=3, limit=LIMIT,
                    progress=False, registry=env["reg"], sort=False).probability(src)
    for x, y in zip(a, b):
        assert x["avg_loss"] == pytest.approx(y["avg_loss"], rel=1e-6)


def test_metrics_share_forward_passes(env, monkeypatch):
    import harness.scoring.primitives as prim

    calls = []
    real = prim.forward_stats

    def counting(model, items, *a, **kw):
        calls.append(len(items))
        return real(model, items, *a, **kw)

    monkeypatch.setattr(prim, "forward_stats", counting)
    names = ["forget_Q_A_Prob", "mia_min_k", "mia_loss", "mia_zlib", "extraction_strength", "exact_memorization"]
    for share, expected in ((True, 2), (False, 1 + 2 * 3 + 2)):
        calls.clear()
        ctx = EvalContext(env["task"], env["model"], env["tok"], env["template"], limit=LIMIT, progress=False,
                          registry=env["reg"], share=share)
        for n in names:
            ctx.score(n)
        # shared: one pass over forget_eval answers and one over holdout; naive: each metric its own
        assert len(calls) == expected
        # Min-k++ reads z-scores, which the shared passes leave out unless asked: asked last, both are redone
        ctx.score("mia_min_k_plus_plus")
        assert len(calls) == expected + 2


def test_attention_mask_switch_reproduces_the_pad_eq_eos_quirk(env):
    tok = copy.deepcopy(env["tok"])
    tok.pad_token = tok.eos_token  # as for Llama-3: pad = eos
    # an eos inside the prompt, like Llama-3's <|eot_id|> after the user turn
    tmpl = Template(user_start_tag="<|user|>", user_end_tag=tok.eos_token, asst_start_tag="<|assistant|>")
    src = Source("forget_eval", "answer")
    got = {}
    for mode in ("reference", "corrected"):
        ctx = EvalContext(env["task"], env["model"], tok, tmpl, limit=3, progress=False, registry=env["reg"],
                          attention_mask=mode)
        got[mode] = [p["avg_loss"] for p in ctx.probability(src)]
    rows = _rows("forget01_perturbed", 3)
    for i, row in enumerate(rows):
        prompt = tmpl.user_start_tag + row["question"] + tmpl.user_end_tag + tmpl.asst_start_tag
        ids = tok(prompt + row["answer"])["input_ids"] + [tok.eos_token_id]
        n_prompt = len(tok(prompt)["input_ids"])
        t = torch.tensor([ids])
        for mode, mask in (("reference", (t != tok.eos_token_id).long()), ("corrected", torch.ones_like(t))):
            with torch.no_grad():
                lsm = env["model"](t, attention_mask=mask).logits[0].float().log_softmax(-1)
            nll = -sum(lsm[p - 1, ids[p]].item() for p in range(n_prompt, len(ids))) / (len(ids) - n_prompt)
            assert got[mode][i] == pytest.approx(nll, rel=1e-5), mode
    assert got["reference"] != pytest.approx(got["corrected"], rel=1e-4)


def test_missing_reference_is_an_error_naming_the_task_and_the_fix(env):
    with pytest.raises(HarnessError, match=r"forget_quality.*tofu_forget01.*--reference"):
        evaluate_task(env["task"], env["model"], env["tok"], env["template"], limit=2,
                      metrics=["forget_quality"], progress=False, registry=env["reg"])


def test_reference_logs_missing_keys_and_summary_for_privleak(env, tmp_path):
    kw = dict(limit=LIMIT, progress=False, registry=env["reg"])
    args = (env["task"], env["model"], env["tok"], env["template"])
    log = tmp_path / "TOFU_EVAL.json"
    log.write_text(json.dumps({"mia_min_k": {"agg_value": 0.6, "auc": 0.6}}))
    with pytest.raises(HarnessError, match=r"TOFU_EVAL.json.*forget_truth_ratio"):
        evaluate_task(*args, reference=str(log), metrics=["forget_quality"], **kw)
    summ = tmp_path / "TOFU_SUMMARY.json"
    summ.write_text(json.dumps({"mia_min_k": 0.4}))
    s = evaluate_task(*args, reference=str(summ), metrics=["privleak"], **kw)
    from harness.metrics.mia import privleak_value

    assert s["privleak"].value == privleak_value(s["mia_min_k"].value, 0.4)
    with pytest.raises(HarnessError, match=r"value_by_index|forget_truth_ratio"):
        evaluate_task(*args, reference=str(summ), metrics=["forget_quality"], **kw)
    # an open-unlearning log of a retain model works as is
    from harness.scoring.reference import bundled_log

    s = evaluate_task(*args, reference=str(bundled_log("tofu_Llama-2-7b-chat-hf_retain99/TOFU_EVAL.json")),
                      metrics=["forget_quality"], **kw)
    assert 0 <= s["forget_quality"].value <= 1


def test_cli_eval_writes_the_run_directory(env, tmp_path):
    from harness_test_helpers import run_cli

    tmpl = tmp_path / "template.yaml"
    tmpl.write_text('user_start_tag: "<|user|>"\nuser_end_tag: ""\nasst_start_tag: "<|assistant|>"\n'
                    'asst_end_tag: "\\n"\n')
    out = tmp_path / "results"
    rc, stdout, _ = run_cli("eval", "-t", "tofu_forget01", "--model", env["full"], "--template", tmpl,
                            "--reference", env["retain"], "--limit", 3, "-o", out, "--batch-size", 8)
    assert rc == 0
    runs = list(out.glob("*/tofu_forget01/eval/*-s0"))
    assert len(runs) == 1
    assert (runs[0] / "TOFU_EVAL.json").is_file() and (runs[0] / "config.yaml").is_file()
    assert json.loads((runs[0] / "scores.json").read_text())["partial"] is True
    assert "forget_quality" in stdout and "↑" in stdout
    rc, _, err = run_cli("eval", "-t", "tofu_forget0*", "--model", env["full"], "--template", tmpl,
                         "--reference", env["retain"], "--limit", 2, "-o", out, check=False)
    assert rc != 0 and "{task}" in err
