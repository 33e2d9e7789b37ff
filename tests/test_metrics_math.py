"""Metric arithmetic against values computed by hand on tiny inputs (spec 6.2)."""

import math
from math import comb

import numpy as np
import pytest

from harness.metrics.memorization import exact_memorization_score, extraction_strength_score
from harness.metrics.mia import mia_auc, min_k_plus_plus_score, min_k_score, privleak_value, zlib_score
from harness.metrics.rouge import cut_generation, rouge_scores
from harness.metrics.tofu import (
    harmonic_mean,
    ks_pvalue,
    mean_prob,
    probability_w_options,
    truth_ratio_aggregate,
    truth_ratios,
)


def test_truth_ratio_geometric_mean_of_wrong_answers_and_epsilon():
    # P_c = exp(-1); wrong losses 1 and 3 -> P_w = exp(-2) (geometric mean of e^-1, e^-3)
    (tr,) = truth_ratios([1.0], [[1.0, 3.0]])
    assert tr == pytest.approx(math.exp(-2) / (math.exp(-1) + 1e-10), rel=1e-15)
    assert tr == pytest.approx(math.exp(-1), rel=1e-9)
    # the arithmetic mean of the wrong probabilities would give a different number
    assert abs(tr - (math.exp(-1) + math.exp(-3)) / 2 / math.exp(-1)) > 0.05
    # prob_mean: P_c / (P_c + P_w + eps)
    (pm,) = truth_ratios([1.0], [[1.0, 3.0]], "prob_mean")
    assert pm == pytest.approx(math.exp(-1) / (math.exp(-1) + math.exp(-2)), rel=1e-9)
    # a correct answer of probability 0 hits the epsilon, not a division by zero
    (big,) = truth_ratios([1e6], [[1.0]])
    assert big == pytest.approx(math.exp(-1) / 1e-10, rel=1e-9)


def test_truth_ratio_aggregators():
    trs = [0.5, 2.0, 1.0, 4.0]
    # closer_to_1_better: mean min(TR, 1/TR) = (0.5 + 0.5 + 1 + 0.25) / 4
    assert truth_ratio_aggregate(trs, "closer_to_1_better") == pytest.approx(2.25 / 4, rel=1e-9)
    # true_better: mean max(0, 1 - TR) = (0.5 + 0 + 0 + 0) / 4
    assert truth_ratio_aggregate(trs, "true_better") == pytest.approx(0.125, abs=1e-15)
    assert truth_ratio_aggregate(trs, "prob_mean") == pytest.approx(7.5 / 4)
    with pytest.raises(Exception, match="aggregator"):
        truth_ratio_aggregate(trs, "median")


def test_probability_with_options_and_mean_prob():
    (p,) = probability_w_options([0.6], [[0.1, 0.1, 0.2]])
    assert p == pytest.approx(0.6 / (1.0 + 1e-10), rel=1e-15)
    assert mean_prob([{"prob": 0.2}, {"prob": 0.4}, {"prob": None}]) == pytest.approx(0.3)
    # multi-answer: mean over the answers of each sample, then over samples
    assert mean_prob([{"prob": [0.1, 0.3]}, {"prob": [0.5]}]) == pytest.approx((0.2 + 0.5) / 2)


@pytest.mark.parametrize("n,expected", [(40, 1.86e-23), (200, 1.94e-119), (400, 1.06e-239)])
def test_ks_floor_for_complete_separation(n, expected):
    x = list(np.linspace(0.01, 0.4, n))
    y = list(np.linspace(0.5, 0.9, n))
    p = ks_pvalue(x, y)
    assert p == pytest.approx(2 / comb(2 * n, n), rel=1e-6)
    assert p == pytest.approx(expected, rel=5e-3)  # the floor values in the published tables


def test_ks_identical_samples():
    x = [0.1, 0.2, 0.3, 0.4]
    assert ks_pvalue(x, x) == pytest.approx(1.0)


def test_harmonic_mean_with_a_zero_and_without():
    assert harmonic_mean([0.5, 0.0, 0.9]) == 0.0
    assert harmonic_mean([0.5, 0.25]) == pytest.approx(2 / (1 / 0.5 + 1 / 0.25))


def test_min_k_drops_nothing_itself_and_takes_max_1_int_nk():
    lp = [-0.1, -2.0, -0.5, -3.0, -0.2]
    # N = 5, k = 0.4 -> int(2.0) = 2 smallest: -3, -2 -> score 2.5
    assert min_k_score(lp, 0.4) == pytest.approx(2.5)
    # k = 0.1 -> int(0.5) = 0 -> max(1, 0) = 1 -> only the smallest
    assert min_k_score(lp, 0.1) == pytest.approx(3.0)
    assert min_k_score([], 0.4) == 0.0
    assert min_k_plus_plus_score([1.0, -1.0, 0.5], 0.4) == pytest.approx(1.0)


def test_min_k_on_real_sequence_drops_the_last_labelled_token():
    """P2 excludes the final labelled token (the eos prediction): a very unlikely eos is ignored."""
    import torch

    from harness.scoring.primitives import _seq_stats

    torch.manual_seed(0)
    V, T = 7, 6
    logits = torch.randn(T, V)
    ids = torch.tensor([1, 2, 3, 4, 5, 6])
    labels = torch.tensor([-100, -100, 3, 4, 5, 6])  # labelled tokens at 2..5; 6 plays eos
    logits[4, 6] = -50.0  # the eos is very unlikely; must not influence min-k
    s = _seq_stats(logits, ids, labels)
    lsm = torch.log_softmax(logits, -1)
    expected_lp = [lsm[1, 3].item(), lsm[2, 4].item(), lsm[3, 5].item()]
    assert s.lp.tolist() == pytest.approx(expected_lp, rel=1e-6)
    # int(3 * 0.4) = 1 -> the single smallest of the three
    assert min_k_score(s.lp, 0.4) == pytest.approx(-min(expected_lp), rel=1e-6)
    # P1 includes the eos: mean NLL over the four labelled tokens
    nll = -(lsm[1, 3] + lsm[2, 4] + lsm[3, 5] + lsm[4, 6]).item() / 4
    assert s.avg_loss == pytest.approx(nll, rel=1e-6)
    assert s.prob == pytest.approx(math.exp(-nll), rel=1e-6)
    # argmax hits and Min-k++ z at the same three positions
    assert s.hit.tolist() == [int(lsm[t].argmax()) == int(ids[t + 1]) for t in (1, 2, 3)]
    p = lsm[1].exp()
    mu = (p * lsm[1]).sum()
    sigma = ((p * lsm[1] ** 2).sum() - mu**2).sqrt()
    assert s.z[0] == pytest.approx(((lsm[1, 3] - mu) / sigma).item(), rel=1e-5)


def test_auc_with_ties_and_direction():
    # forget (label 0) scores lower (more member-like) than holdout -> AUC 1
    assert mia_auc([0.1, 0.2], [0.5, 0.6]) == 1.0
    assert mia_auc([0.5, 0.6], [0.1, 0.2]) == 0.0
    # all tied -> 0.5; one tie between classes counts half: pairs (f,h): (1,1)=.5, (1,3)=1, (2,1)=0, (2,3)=1
    assert mia_auc([1.0, 1.0], [1.0, 1.0]) == 0.5
    assert mia_auc([1.0, 2.0], [1.0, 3.0]) == pytest.approx(2.5 / 4)


def test_privleak_sign_and_value():
    # model AUC 1 (memorised): s = 0; retain AUC 0.5: r = 0.5 -> -100 (minus the epsilon effect)
    assert privleak_value(1.0, 0.5) == pytest.approx(-100.0, abs=1e-7)
    assert privleak_value(1.0, 0.5) > -100.0
    # model less member-like than retain -> positive
    assert privleak_value(0.3, 0.5) == pytest.approx((0.7 - 0.5) / 0.5 * 100)
    assert privleak_value(0.5, 0.5) == 0.0


def test_zlib_score():
    import zlib

    text = "Basil Mahfouz Al-Kuwaiti"
    assert zlib_score(2.0, text) == 2.0 / len(zlib.compress(text.encode("utf-8")))


def test_exact_memorization_and_extraction_strength_floor():
    assert exact_memorization_score([True, False, True, True]) == 0.75
    assert exact_memorization_score([]) is None
    # the suffix from index 1 is right -> k = 1 -> ES = 1 - 1/4
    assert extraction_strength_score([False, True, True, True]) == 1 - 1 / 4
    assert extraction_strength_score([True, False, True, True]) == 1 - 2 / 4
    # nothing matches, not even the last token -> k ends at N-1 -> floor 1/N (reference quirk)
    assert extraction_strength_score([False, False, False, False]) == pytest.approx(1 / 4)
    assert extraction_strength_score([True, True, True]) == 1.0
    assert extraction_strength_score([]) == 0.0


def test_rouge_recall_f1_stemmer_and_cut():
    s = rouge_scores("The cats were running home", "cat runs home quickly today")
    # stemmed unigrams: target {the, cat, were, run, home}; prediction {cat, run, home, quickli, today}
    assert s["rouge1_recall"] == pytest.approx(3 / 5)
    # LCS = cat run home (3): recall 3/5, precision 3/5 -> F1 0.6
    assert s["rougeL_recall"] == pytest.approx(3 / 5)
    assert s["rougeL_f1"] == pytest.approx(0.6)
    assert cut_generation(" answer here</s> junk\nQuestion: x", ["</s>", "\nQuestion"]) == "answer here"
    assert cut_generation("a\nQuestion: b</s>", ["</s>", "\nQuestion"]) == "a"
