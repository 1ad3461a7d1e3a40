"""Each operation of the reference against tiny cases computed by hand (MTA_SPEC sections 2-6)."""

import math

import pytest
import torch

from modeling_mta.mta_reference import (
    depth_scale,
    group_norm,
    head_mix,
    key_query_conv,
    masked_softmax,
    mta_attention,
)

CAUSAL4 = torch.ones(4, 4).tril().bool()
# Scores 1..16 row by row; causal masking leaves the lower triangle.
SCORES = torch.arange(1.0, 17.0).reshape(1, 1, 4, 4)
# A 2 x 3 kernel: the row above (a = 0) weighs keys j-1, j by 1, 2; the own row (a = 1) weighs j by 10, j+1 by 1
# (with "both" padding; "left" / "right" shift the same taps one key further left / right).
KERNEL = torch.tensor([[[[1.0, 2.0, 0.0], [0.0, 10.0, 1.0]]]])

EXPECTED_CONV = {
    "both": [[10, 0, 0, 0], [58, 61, 0, 0], [110, 128, 116, 0], [162, 184, 198, 171]],
    "left": [[1, 10, 0, 0], [5, 58, 61, 0], [9, 110, 128, 116], [13, 162, 184, 198]],
    "right": [[0, 0, 0, 0], [61, 0, 0, 0], [128, 116, 0, 0], [184, 198, 171, 0]],
}


@pytest.mark.parametrize("padding", ["both", "left", "right"])
def test_key_query_conv_on_a_4x4_score_map(padding):
    out = key_query_conv(SCORES, KERNEL, CAUSAL4, padding)
    assert out.shape == (1, 1, 4, 4)
    torch.testing.assert_close(out[0, 0], torch.tensor(EXPECTED_CONV[padding], dtype=torch.float32), atol=0, rtol=0)


def test_key_query_conv_uses_each_heads_own_kernel():
    scores = torch.cat([SCORES, 2 * SCORES], dim=1)
    kernels = torch.cat([KERNEL, torch.zeros_like(KERNEL)], dim=0)
    kernels[1, 0, 1, 1] = 1.0  # identity for head 1
    out = key_query_conv(scores, kernels, CAUSAL4, "both")
    torch.testing.assert_close(out[0, 0], torch.tensor(EXPECTED_CONV["both"], dtype=torch.float32))
    torch.testing.assert_close(out[0, 1], (2 * SCORES[0, 0]).masked_fill(~CAUSAL4, 0))


def test_padding_token_scores_do_not_enter_the_convolution():
    # Token 1 is padding: its row and column are invisible, so they count as 0.
    visible = CAUSAL4.clone()
    visible[1, :] = False
    visible[:, 1] = False
    out = key_query_conv(SCORES, KERNEL, visible, "both")
    # C[2,0] = S0[1,-1] + 2 S0[1,0] + 10 S0[2,0] + S0[2,1] = 0 + 0 + 90 + 0; C[3,2] = S0[2,1] + 2 S0[2,2] + 10 S0[3,2] + S0[3,3]
    assert out[0, 0, 2, 0] == 90
    assert out[0, 0, 3, 2] == 0 + 22 + 150 + 16


def test_head_mix_groups_of_two():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]).reshape(1, 4, 1, 2)
    weight = torch.tensor([[[1.0, 2.0], [3.0, 4.0]], [[0.0, 1.0], [1.0, 0.0]]])
    out = head_mix(x, weight)[0, :, 0]
    # Group 0: X'0 = 1 X0 + 3 X1, X'1 = 2 X0 + 4 X1. Group 1 swaps its heads.
    expected = torch.tensor([[7.0, 70.0], [10.0, 100.0], [4.0, 40.0], [3.0, 30.0]])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_full_head_mixing_is_one_group_of_all_heads():
    x = torch.tensor([[1.0, 10.0], [2.0, 20.0], [3.0, 30.0], [4.0, 40.0]]).reshape(1, 4, 1, 2)
    # W[c, e] = 1 for e = c - 1 (mod 4): X'e = X(e+1); plus half of X0 into X'0.
    weight = torch.zeros(1, 4, 4)
    for c in range(4):
        weight[0, c, (c - 1) % 4] = 1.0
    weight[0, 0, 0] = 0.5
    out = head_mix(x, weight)[0, :, 0]
    expected = torch.tensor([[2.5, 25.0], [3.0, 30.0], [4.0, 40.0], [1.0, 10.0]])
    torch.testing.assert_close(out, expected, atol=0, rtol=0)


def test_masked_softmax_in_float32_with_empty_rows():
    scores = torch.tensor([[0.0, math.log(3.0), 9.0], [math.log(2.0), 5.0, 0.0], [1.0, 2.0, 3.0]]).to(torch.bfloat16)
    visible = torch.tensor([[True, True, False], [True, False, True], [False, False, False]])
    probs = masked_softmax(scores, visible)
    assert probs.dtype == torch.float32
    expected = torch.tensor([[0.25, 0.75, 0.0], [2 / 3, 0.0, 1 / 3], [0.0, 0.0, 0.0]])
    torch.testing.assert_close(probs, expected, atol=2e-3, rtol=0)  # bf16 inputs: log 3 is rounded
    assert torch.isfinite(probs).all()


def test_post_softmax_conv_is_zero_at_invisible_positions():
    # Zero queries give uniform attention: rows (1), (1/2, 1/2), (1/3, 1/3, 1/3). With v = I the
    # output is the attention map itself. Kernel taps (1, 2, 4) on keys j-1, j, j+1.
    q = torch.zeros(1, 1, 3, 2)
    k = torch.randn(1, 1, 3, 2)
    v = torch.eye(3).reshape(1, 1, 3, 3)
    kernel = torch.tensor([[[[1.0, 2.0, 4.0]]]])
    out, probs = mta_attention(q, k, v, torch.ones(3, 3).tril().bool(), kq_conv_post_weight=kernel)
    expected = torch.tensor([[2.0, 0.0, 0.0], [3.0, 1.5, 0.0], [2.0, 7 / 3, 1.0]])
    torch.testing.assert_close(probs[0, 0], expected)
    torch.testing.assert_close(out[0, 0], expected)


def test_pre_softmax_conv_then_softmax_by_hand():
    # One head, d = 1: q_i . k_j = q_i k_j. Scores / sqrt(1): [[1], [2, 4], [3, 6, 9]] (q = 1, 2, 3; k = 1, 2, 3).
    q = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    k = torch.tensor([1.0, 2.0, 3.0]).reshape(1, 1, 3, 1)
    v = torch.eye(3).reshape(1, 1, 3, 3)
    kernel = torch.tensor([[[[0.5], [1.0]]]])  # 2 x 1: own score plus half the score of the query above
    _, probs = mta_attention(q, k, v, torch.ones(3, 3).tril().bool(), kq_conv_weight=kernel)
    # Convolved scores: row 1: [2 + 0.5, 4 + 0] ; row 2: [3 + 1, 6 + 2, 9 + 0]
    row1 = torch.softmax(torch.tensor([2.5, 4.0]), 0)
    row2 = torch.softmax(torch.tensor([4.0, 8.0, 9.0]), 0)
    torch.testing.assert_close(probs[0, 0, 0], torch.tensor([1.0, 0.0, 0.0]))
    torch.testing.assert_close(probs[0, 0, 1, :2], row1)
    torch.testing.assert_close(probs[0, 0, 2], row2)


def test_pre_softmax_head_mix_mixes_scores_not_probabilities():
    # Two heads with d = 1, q = 1 everywhere: scores are the keys. Head 1 gets head 0's scores times 2.
    q = torch.ones(1, 2, 2, 1)
    k = torch.tensor([[0.0, 1.0], [0.0, 0.0]]).reshape(1, 2, 2, 1)
    v = torch.eye(2).expand(1, 2, 2, 2)
    weight = torch.tensor([[[1.0, 2.0], [0.0, 0.0]]])
    _, probs = mta_attention(q, k, v, torch.ones(2, 2).tril().bool(), head_mix_weight=weight)
    torch.testing.assert_close(probs[0, 0, 1], torch.softmax(torch.tensor([0.0, 1.0]), 0))
    torch.testing.assert_close(probs[0, 1, 1], torch.softmax(torch.tensor([0.0, 2.0]), 0))


def test_gqa_shares_each_key_value_head_with_consecutive_query_heads():
    q = torch.randn(1, 4, 3, 2)
    k = torch.randn(1, 2, 3, 2)
    v = torch.randn(1, 2, 3, 2)
    visible = torch.ones(3, 3).tril().bool()
    out, _ = mta_attention(q, k, v, visible)
    for head in range(4):
        single, _ = mta_attention(q[:, head : head + 1], k[:, head // 2 : head // 2 + 1], v[:, head // 2 : head // 2 + 1], visible)
        torch.testing.assert_close(out[:, head : head + 1], single)


def test_group_norm_with_and_without_depth_scaling():
    x = torch.tensor([3.0, 4.0])
    weight = torch.tensor([1.0, 2.0])
    normed = torch.tensor([3.0, 4.0 * 2.0]) / math.sqrt(12.5 + 1e-5)
    torch.testing.assert_close(group_norm(x, weight), normed)
    scale = 1 - (0.8 - 0.6 * math.exp(-0.3 * 1))
    assert depth_scale(1) == pytest.approx(scale)
    assert depth_scale(0) == pytest.approx(0.8)
    torch.testing.assert_close(group_norm(x, weight, depth_scale(1)), normed * scale)
