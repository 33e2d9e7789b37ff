"""Each loss helper against a hand computation on fixed logits (spec section 3 and 13 item 12)."""

import math

import pytest
import torch

from harness.losses import (
    dpo_loss,
    kl_retain,
    npo_loss,
    sequence_logprob,
    sequence_nll,
    simnpo_loss,
    token_mean_nll,
    token_nll,
)

# B=2 sequences, T=4 positions, V=3 tokens. The logit at t predicts label t+1.
LOGITS = torch.tensor(
    [
        [[2.0, 0.0, -1.0], [0.5, 1.5, 0.0], [0.0, 0.0, 3.0], [1.0, 1.0, 1.0]],
        [[-1.0, 2.0, 0.5], [0.0, 1.0, 2.0], [1.0, -2.0, 0.0], [0.3, 0.2, 0.1]],
    ]
)
# Sequence 0: prompt at 0-1, answer labels at 2,3 -> predicted from positions 1,2.
# Sequence 1: prompt at 0, answer labels at 1,2, padding at 3 -> predicted from positions 0,1.
LABELS = torch.tensor([[-100, -100, 1, 2], [-100, 2, 0, -100]])


def nll(row, pos, target):
    logits = LOGITS[row, pos].tolist()
    return math.log(sum(math.exp(v) for v in logits)) - logits[target]


N00 = nll(0, 1, 1)  # seq 0, label 1 at t=2
N01 = nll(0, 2, 2)  # seq 0, label 2 at t=3
N10 = nll(1, 0, 2)
N11 = nll(1, 1, 0)


def log_sigmoid(x):
    return -math.log1p(math.exp(-x))


def test_token_and_sequence_nll():
    tok = token_nll(LOGITS, LABELS)
    assert tok.shape == (2, 3)
    expected = [0.0, N00, N01, N10, N11, 0.0]
    assert tok.flatten().tolist() == pytest.approx(expected, rel=1e-6)
    assert sequence_nll(LOGITS, LABELS).tolist() == pytest.approx([N00 + N01, N10 + N11], rel=1e-6)
    assert sequence_logprob(LOGITS, LABELS).tolist() == pytest.approx([-(N00 + N01), -(N10 + N11)], rel=1e-6)


def test_token_mean_is_over_all_label_tokens_of_the_batch():
    # HF token-mean: (sum of the 4 label-token NLLs) / 4, not the mean of per-sequence means.
    assert float(token_mean_nll(LOGITS, LABELS)) == pytest.approx((N00 + N01 + N10 + N11) / 4, rel=1e-6)
    uneven = LABELS.clone()
    uneven[1, 2] = -100  # seq 1 keeps one label: mean over 3 tokens
    assert float(token_mean_nll(LOGITS, uneven)) == pytest.approx((N00 + N01 + N10) / 3, rel=1e-6)


def test_npo_loss_hand_values():
    logp = torch.tensor([-3.0, -5.0])
    ref = torch.tensor([-2.5, -6.0])
    beta = 0.1
    expected = -(2 / beta) * (log_sigmoid(-beta * (-0.5)) + log_sigmoid(-beta * 1.0)) / 2
    assert float(npo_loss(logp, ref, beta)) == pytest.approx(expected, rel=1e-6)
    # Equivalent form from the spec: (2/beta) mean log(1 + (pi/pi_ref)^beta).
    alt = (2 / beta) * (math.log1p(math.exp(beta * -0.5)) + math.log1p(math.exp(beta * 1.0))) / 2
    assert float(npo_loss(logp, ref, beta)) == pytest.approx(alt, rel=1e-6)
    # At the start (policy == reference) the loss is (2/beta) log 2.
    assert float(npo_loss(logp, logp, beta)) == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_dpo_loss_hand_values_with_two_over_beta():
    w, rw = torch.tensor([-4.0, -2.0]), torch.tensor([-4.5, -2.2])
    lo, rl = torch.tensor([-7.0, -3.0]), torch.tensor([-6.0, -3.5])
    beta = 0.1
    m0 = (-4.0 + 4.5) - (-7.0 + 6.0)  # 1.5
    m1 = (-2.0 + 2.2) - (-3.0 + 3.5)  # -0.3
    expected = -(2 / beta) * (log_sigmoid(beta * m0) + log_sigmoid(beta * m1)) / 2
    assert float(dpo_loss(w, rw, lo, rl, beta)) == pytest.approx(expected, rel=1e-6)


def test_simnpo_loss_uses_mean_nll_and_beta_times_delta():
    beta, delta = 4.5, 0.3
    avg0, avg1 = (N00 + N01) / 2, (N10 + N11) / 2
    expected = -(2 / beta) * (log_sigmoid(beta * (avg0 - delta)) + log_sigmoid(beta * (avg1 - delta))) / 2
    assert float(simnpo_loss(LOGITS, LABELS, beta, delta)) == pytest.approx(expected, rel=1e-6)
    # n_i counts unshifted labels: a label at position 0 counts but has no prediction (reference behaviour).
    labels = LABELS.clone()
    labels[1, 0] = 1
    expected_b = -(2 / beta) * (log_sigmoid(beta * (avg0 - delta)) + log_sigmoid(beta * ((N10 + N11) / 3 - delta))) / 2
    assert float(simnpo_loss(LOGITS, labels, beta, delta)) == pytest.approx(expected_b, rel=1e-6)


def test_kl_retain_averages_over_all_positions_unmasked():
    ref = LOGITS.flip(-1) * 0.7
    total = 0.0
    for b in range(2):
        for t in range(4):
            cur_l, ref_l = LOGITS[b, t].tolist(), ref[b, t].tolist()
            zc = math.log(sum(math.exp(v) for v in cur_l))
            zr = math.log(sum(math.exp(v) for v in ref_l))
            for v in range(3):
                lr, lc = ref_l[v] - zr, cur_l[v] - zc
                total += math.exp(lr) * (lr - lc)
    assert float(kl_retain(LOGITS, ref)) == pytest.approx(total / 8, rel=1e-6)
    assert float(kl_retain(LOGITS, LOGITS)) == pytest.approx(0.0, abs=1e-7)


def test_bf16_logits_are_upcast():
    low = LOGITS.to(torch.bfloat16)
    assert token_nll(low, LABELS).dtype == torch.float32
    assert float(token_mean_nll(low, LABELS)) == pytest.approx(float(token_mean_nll(low.float(), LABELS)), rel=1e-7)
