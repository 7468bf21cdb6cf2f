"""The eager references are the oracle for every kernel, so they are checked on hand-computed cases."""

import math

import pytest
import torch

import maskkv_kernels as mk
from maskkv_kernels import reference as R


def _qkv(B=1, Hq=2, Hkv=1, M=3, L=10, D=8, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Hq, M, D, generator=g).to(dtype)
    k = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    v = torch.randn(B, Hkv, L, D, generator=g).to(dtype)
    return q, k, v


def test_mask_scores_hand_computed():
    # One head, one query, D=1: logits are q*k*scale; compute the softmax by hand.
    q = torch.tensor([[[[2.0]]]])
    k = torch.tensor([[[[0.0], [1.0], [2.0], [-1.0]]]])  # P=2 prompt keys, 2 mask keys
    scores, mask_mass = R.mask_scores(q, k, prompt_len=2, scale=1.0)
    e = [math.exp(2.0 * x) for x in (0.0, 1.0, 2.0, -1.0)]
    z = sum(e)
    assert scores.shape == (1, 1, 2)
    torch.testing.assert_close(scores[0, 0], torch.tensor([e[0] / z, e[1] / z]))
    torch.testing.assert_close(mask_mass[0], torch.tensor([(e[2] + e[3]) / z]))


def test_mask_scores_sum_to_group_times_queries():
    B, Hq, Hkv, M, L, P = 2, 8, 2, 5, 17, 11
    q, k, _ = _qkv(B, Hq, Hkv, M, L)
    lens = torch.tensor([11, 6])
    scores, mask_mass = R.mask_scores(q, k, prompt_len=P, prompt_lens=lens)
    total = scores.sum(-1) + mask_mass
    torch.testing.assert_close(total, torch.full((B, Hkv), float(Hq // Hkv * M)))
    assert (scores[1, :, : P - 6] == 0).all(), "padding keys receive no attention"


def test_mask_scores_lse_matches_recomputed():
    q, k, _ = _qkv(1, 4, 2, 3, 12)
    logits = torch.einsum("bhmd,bhld->bhml", q, k.repeat_interleave(2, 1)) / math.sqrt(8)
    lse = torch.logsumexp(logits, -1)
    a = R.mask_scores(q, k, prompt_len=7)
    b = R.mask_scores(q, k, prompt_len=7, lse=lse)
    torch.testing.assert_close(a, b)


def test_window_scores_pooling_and_forced_window():
    # Scores before pooling are known exactly when all keys are equal: uniform softmax.
    B, Hq, W, P, D = 1, 1, 2, 8, 4
    q = torch.zeros(B, Hq, W, D)
    k = torch.randn(B, 1, P, D)
    s = R.window_scores(q, k, prompt_len=P, pool="none")
    torch.testing.assert_close(s[0, 0, : P - W], torch.full((P - W,), W / P))
    assert torch.isinf(s[0, 0, P - W :]).all()
    # Max pooling over a single spike spreads it to kernel//2 neighbours on each side, but
    # only within the non-window range [0, P - W).
    q = torch.zeros(1, 1, 1, 1)
    q[..., 0] = 10.0
    k = torch.zeros(1, 1, 10, 1)
    k[0, 0, 2, 0] = 1.0  # the spike at position 2
    s = R.window_scores(q, k, prompt_len=10, pool="max", pool_kernel=3, scale=1.0)
    spike = s[0, 0, 2].item()
    assert s[0, 0, 1].item() == spike and s[0, 0, 3].item() == spike
    assert s[0, 0, 5].item() < spike
    assert math.isinf(s[0, 0, 9].item())


def test_window_scores_padding_never_scores():
    q, k, _ = _qkv(2, 2, 2, 4, 20)
    lens = torch.tensor([20, 9])
    s = R.window_scores(q, k, prompt_len=20, prompt_lens=lens)
    assert (s[1, :, :11] == 0).all()
    assert torch.isinf(s[1, :, 16:]).all()


def test_topk_gather_ties_nan_and_order():
    scores = torch.tensor([[[1.0, 3.0, 3.0, float("nan"), 2.0, 3.0]]])
    k = torch.arange(6.0).view(1, 1, 6, 1).expand(1, 1, 6, 2).contiguous()
    cache = R.topk_gather(scores, k, k.clone(), torch.tensor([[3]]))
    # Three 3.0 ties: all kept (positions 1, 2, 5), ascending.
    assert cache.positions.tolist() == [1, 2, 5]
    cache = R.topk_gather(scores, k, k.clone(), torch.tensor([[2]]))
    assert cache.positions.tolist() == [1, 2], "ties go to the lower position"
    cache = R.topk_gather(scores, k, k.clone(), torch.tensor([[6]]))
    assert cache.positions.tolist() == [0, 1, 2, 3, 4, 5], "NaN still kept when everything fits"
    cache = R.topk_gather(scores, k, k.clone(), torch.tensor([[5]]))
    assert 3 not in cache.positions.tolist(), "NaN ranks lowest"
    assert torch.equal(cache.k[:, 0], cache.positions.float())


def test_select_and_gather_keeps_window_and_skips_padding():
    B, Hq, Hkv, W, P = 2, 4, 2, 3, 16
    q, k, v = _qkv(B, Hq, Hkv, W, P)
    lens = torch.tensor([16, 7])
    cache = R.select_and_gather(q, k, v, 5, prompt_len=P, prompt_lens=lens, score="window")
    pos, valid = cache.to_padded()[2:]
    for b in range(B):
        for g in range(Hkv):
            kept = pos[b, g][valid[b, g]].tolist()
            assert set(range(P - W, P)) <= set(kept), "window positions are always kept"
            assert min(kept) >= P - lens[b].item(), "padding is never kept"
            assert len(kept) == 5


def test_select_and_gather_budget_edges():
    q, k, v = _qkv(1, 2, 2, 3, 12)
    empty = R.select_and_gather(q, k, v, 0, prompt_len=8)
    assert empty.k.shape == (0, 8) and empty.cu_seqlens.tolist() == [0, 0, 0]
    full = R.select_and_gather(q, k, v, 100, prompt_len=8)
    assert full.lengths().tolist() == [[8, 8]]
    torch.testing.assert_close(full.to_padded()[0], k[:, :, :8], rtol=0, atol=0)


@pytest.mark.parametrize("G", [1, 4])
def test_ragged_attention_equals_dense_on_concatenated_keys(G):
    B, Hkv, Lq, D, P, Lt = 2, 2, 3, 8, 9, 4
    q = torch.randn(B, Hkv * G, Lq, D)
    k, v = torch.randn(B, Hkv, P + Lt, D), torch.randn(B, Hkv, P + Lt, D)
    cache = R.topk_gather(torch.rand(B, Hkv, P), k, v, torch.tensor([[3, 0], [9, 5]]))
    out, lse = R.ragged_attention(q, cache, k[:, :, P:], v[:, :, P:], return_lse=True)
    kp, vp, _, valid = cache.to_padded()
    for b in range(B):
        for h in range(Hkv * G):
            g = h // G
            n = int(valid[b, g].sum())
            kk = torch.cat([kp[b, g, :n], k[b, g, P:]])
            vv = torch.cat([vp[b, g, :n], v[b, g, P:]])
            ref = torch.nn.functional.scaled_dot_product_attention(
                q[b, h][None], kk[None], vv[None]
            )[0]
            torch.testing.assert_close(out[b, h], ref, rtol=1e-5, atol=1e-5)
            logits = q[b, h] @ kk.T / math.sqrt(D)
            torch.testing.assert_close(lse[b, h], torch.logsumexp(logits, -1))


def test_ragged_attention_no_keys_gives_zero():
    q = torch.randn(1, 1, 2, 4)
    cache = mk.RaggedKV(
        torch.empty(0, 4),
        torch.empty(0, 4),
        torch.zeros(2, dtype=torch.int32),
        torch.empty(0, dtype=torch.int32),
        0,
        1,
    )
    out, lse = R.ragged_attention(q, cache, return_lse=True)
    assert (out == 0).all() and torch.isinf(lse).all()


def test_ragged_kv_validation_and_padded_roundtrip():
    k = torch.randn(5, 4)
    cache = mk.RaggedKV(
        k,
        k + 1,
        torch.tensor([0, 2, 2, 5], dtype=torch.int32),
        torch.tensor([0, 3, 1, 2, 4], dtype=torch.int32),
        3,
        3,
    )
    assert cache.lengths().tolist() == [[2, 0, 3]]
    assert cache.nbytes == 2 * 5 * 4 * 4 + 5 * 4 + 4 * 4
    kp, vp, pos, valid = cache.to_padded()
    assert kp.shape == (1, 3, 3, 4) and valid.sum() == 5
    assert torch.equal(kp[0, 2], k[2:5]) and pos[0, 1].tolist() == [-1, -1, -1]
    with pytest.raises(ValueError, match="max_seqlen"):
        mk.RaggedKV(
            k,
            k,
            torch.tensor([0, 2, 2, 5], dtype=torch.int32),
            torch.zeros(5, dtype=torch.int32),
            2,
            3,
        )
    with pytest.raises(ValueError, match="cu_seqlens"):
        mk.RaggedKV(
            k,
            k,
            torch.tensor([0, 2, 5], dtype=torch.int64),
            torch.zeros(5, dtype=torch.int32),
            3,
            2,
        )
    with pytest.raises(ValueError, match="v must have"):
        mk.RaggedKV(
            k,
            k[:4],
            torch.tensor([0, 5], dtype=torch.int32),
            torch.zeros(5, dtype=torch.int32),
            5,
            1,
        )
