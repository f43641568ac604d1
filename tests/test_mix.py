import pytest
import torch

from taro_vllm import features, mix
from taro_vllm.router import RouterConfig, build_router

V = 4096


def pair(n=6, v=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 5).to(dtype), (torch.randn(n, v, generator=g) * 5).to(dtype)


def random_router(kind="topk", v=V):
    torch.manual_seed(1)
    r = build_router(RouterConfig(kind=kind, vocab_size=v))
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return r.eval()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a0_is_exactly_base_and_a1_exactly_reward(dtype):
    zb, zr = pair(dtype=dtype)
    n = zb.shape[0]
    for fn in (mix.mix_reference, lambda b, r, a: mix.mix_rows(b, r, torch.full((n,), float(a)))):
        assert torch.equal(fn(zb, zr, 0.0), zb.float())
        assert torch.equal(fn(zb, zr, 1.0), zr.float())
    assert torch.equal(mix.route_and_mix(zb, zr, override=torch.zeros(n)).logits, zb.float())
    assert torch.equal(mix.route_and_mix(zb, zr, override=torch.ones(n)).logits, zr.float())


@pytest.mark.parametrize("kind", ["topk", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_equals_reference_within_tolerance(kind, dtype):
    # Tolerance atol=1e-5 (a few fp32 ulps of |z| < 30): the fused path may order its fp32 operations differently.
    zb, zr = pair(dtype=dtype)
    router = random_router(kind)
    res = mix.route_and_mix(zb, zr, router=router)
    a_ref = router(zb, zr)
    torch.testing.assert_close(res.alpha, a_ref, atol=0, rtol=0)
    torch.testing.assert_close(res.logits, mix.mix_reference(zb, zr, a_ref), atol=1e-5, rtol=0)
    assert not res.nonfinite.any()


def test_per_row_overrides_replace_the_router_only_where_set():
    zb, zr = pair()
    router = random_router()
    a_router = router(zb, zr)
    ovr = torch.tensor([float("nan"), 0.0, 1.0, 0.25, float("nan"), 0.5])
    res = mix.route_and_mix(zb, zr, router=router, override=ovr)
    expected_a = torch.where(torch.isnan(ovr), a_router, ovr)
    torch.testing.assert_close(res.alpha, expected_a)
    assert torch.equal(res.logits[1], zb[1]) and torch.equal(res.logits[2], zr[2])
    torch.testing.assert_close(res.alpha_router, a_router)


def test_fixed_mix_needs_no_router_but_unset_rows_do():
    zb, zr = pair()
    with pytest.raises(ValueError, match="router"):
        mix.route_and_mix(zb, zr, override=torch.tensor([0.5, float("nan"), 0.5, 0.5, 0.5, 0.5]))
    with pytest.raises(ValueError):
        mix.route_and_mix(zb, zr)


@pytest.mark.parametrize("router_kind", [None, "topk", "full"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nonfinite_rows_are_reported_and_strict_mode_raises(router_kind, bad):
    zb, zr = pair()
    zr[3, 17] = bad
    router = random_router(router_kind) if router_kind else None
    ovr = None if router else torch.full((6,), 0.3)
    res = mix.route_and_mix(zb, zr, router=router, override=ovr)
    assert res.nonfinite.tolist() == [False, False, False, True, False, False]
    with pytest.raises(mix.NonFiniteLogitsError, match=r"rows \[3\]"):
        mix.route_and_mix(zb, zr, router=router, override=ovr, strict=True)


@pytest.mark.parametrize("use_router", [True, False])
def test_minus_inf_masked_tokens_stay_masked_and_are_not_flagged(use_router):
    zb, zr = pair()
    zb[:, :10] = float("-inf")  # e.g. banned tokens in the base
    zr[:, 5:15] = float("-inf")
    router = random_router() if use_router else None
    res = mix.route_and_mix(zb, zr, router=router, override=None if use_router else torch.full((6,), 0.4))
    assert bool(((res.alpha > 0) & (res.alpha < 1)).all())
    assert not res.nonfinite.any() and not torch.isnan(res.logits).any()
    assert torch.isneginf(res.logits[:, :15]).all() and torch.isfinite(res.logits[:, 15:]).all()


def test_a0_ignores_a_reward_row_that_is_all_garbage():
    zb, zr = pair()
    zr[2] = float("nan")
    res = mix.route_and_mix(zb, zr, override=torch.tensor([0.5, 0.5, 0.0, 0.5, 0.5, 0.5]))
    assert torch.equal(res.logits[2], zb[2]) and not res.nonfinite.any()


def test_reward_vocab_is_cropped_or_padded_to_the_base_vocab():
    zb, zr = pair(v=100)
    wider = torch.cat([zr, torch.randn(6, 28)], dim=1)
    assert torch.equal(mix.align_vocab(wider, zb), zr)
    narrower = zr[:, :90]
    aligned = mix.align_vocab(narrower, zb)
    assert aligned.shape == zb.shape and torch.equal(aligned[:, 90:], zb[:, 90:])
    # Mixed over the padded columns equals the base there, for any a.
    res = mix.route_and_mix(zb, narrower, override=torch.full((6,), 0.7))
    torch.testing.assert_close(res.logits[:, 90:], zb[:, 90:])


def test_topk_features_are_log_probs_at_the_selected_ids():
    zb, zr = pair(v=50)
    f = mix.topk_features(zb, zr, k=4, source="both")
    assert f.ids.shape == (6, 8)
    assert torch.equal(f.ids[:, :4], zb.topk(4).indices)
    torch.testing.assert_close(f.logp_reward, torch.log_softmax(zr, -1).gather(1, f.ids))
    f_base = mix.topk_features(zb, zr, k=4, source="base")
    assert torch.equal(f_base.ids, zb.topk(4).indices)  # sorted by the base's logit


@pytest.mark.parametrize("v", [4096, 49152, 151_936 + 37])  # a vocab tail that is not a whole block too
@pytest.mark.parametrize("k", [1, 8, 32])
def test_blocked_topk_ids_equal_torch_topk(v, k):
    zb, _ = pair(n=5, v=v, seed=v + k)
    zb[0, ::3] = float("-inf")  # masked tokens
    zb[1, -5:] = 100.0 + torch.arange(5.0)  # the winners sit in the tail
    zb[2, :64] = 50.0 + torch.arange(64.0)  # every winner in one block
    assert torch.equal(mix.topk_ids(zb, k), zb.topk(k).indices)


def test_blocked_topk_survives_nan_rows():
    zb, _ = pair(n=3, v=8192)
    zb[1, 100] = float("nan")
    ids = mix.topk_ids(zb, 8)
    assert ids.shape == (3, 8) and torch.equal(ids[[0, 2]], zb[[0, 2]].topk(8).indices)


# The CPU features: one chunked pass per model (features.row_stats) for the row logsumexp and the block maxima that
# the blocked top-K reads. References: torch.logsumexp / torch.log_softmax on fp32 copies, torch.topk.


def awkward_rows(v, dtype, seed=0):
    """Rows a real step may hold: plain, masked (-inf) tokens, ties, and one NaN / +inf / all -inf row each."""
    zb, zr = pair(n=8, v=v, seed=seed)
    zb[1, ::3] = float("-inf")  # masked tokens
    zb[2, : v // 2] = 7.0  # half the row tied at the same value
    zb[3, 5] = float("nan")
    zb[4, v - 1] = float("inf")
    zb[5] = float("-inf")  # nothing allowed
    zr[6, :] = zr[6, :].round()  # many ties everywhere
    return zb.to(dtype), zr.to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v", [50, 4096, 49152 + 37, 151_936])  # below one block, and a vocab tail not a whole block
def test_row_stats_logsumexp_equals_torch_and_is_nonfinite_only_where_the_row_is(dtype, v):
    zb, zr = awkward_rows(v, dtype)
    sb, sr = features.row_stats((zb, zr))
    ref_b, ref_r = torch.logsumexp(zb.float(), -1), torch.logsumexp(zr.float(), -1)
    assert sb.lse.dtype == torch.float32 and sb.lse.shape == (8,)
    # within fp32 rounding (|lse| < 40 here: an ulp is 4e-6); NaN, +inf and -inf where torch has them
    torch.testing.assert_close(sb.lse, ref_b, rtol=1e-6, atol=1e-5, equal_nan=True)
    torch.testing.assert_close(sr.lse, ref_r, rtol=1e-6, atol=1e-5)
    assert torch.isnan(sb.lse).tolist() == [i == 3 for i in range(8)]
    assert (sb.lse == float("inf")).tolist() == [i == 4 for i in range(8)]
    assert (sb.lse == float("-inf")).tolist() == [i == 5 for i in range(8)]
    nblk = v // 64
    assert sb.block_max.shape == (8, nblk)
    if nblk:
        assert torch.equal(sb.block_max[[0, 1, 2, 4, 5, 6]], zb.float()[[0, 1, 2, 4, 5, 6], : nblk * 64]
                           .unflatten(1, (nblk, 64)).amax(-1))


def test_row_stats_do_not_depend_on_how_rows_are_chunked(monkeypatch):
    zb, zr = pair(n=11, v=5000, seed=3)
    whole = features.row_stats((zb, zr))
    monkeypatch.setattr(features, "_CHUNK_ELEMS", 3 * 5000)  # chunks of 3 rows, the last one of 2
    chunked = features.row_stats((zb, zr))
    for a, b in zip(whole, chunked):
        assert torch.equal(a.lse, b.lse) and torch.equal(a.block_max, b.block_max)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("v,k", [(4096, 16), (4096, 17), (49152 + 37, 8), (151_936, 32), (50, 8)])
def test_topk_features_equal_torch_topk_and_log_softmax(dtype, v, k):
    # 4096 = 64 blocks: k = 16 is the largest k the blocked search takes (4k blocks), k = 17 falls back to torch.topk
    zb, zr = awkward_rows(v, dtype, seed=v + k)
    zb[7, -3:] = 90.0  # the winners sit in the vocab tail
    finite = [0, 1, 2, 6, 7]  # rows 3-5 hold NaN / +inf / nothing: only their lse is checked (above)
    f = mix.topk_features(zb, zr, k, "both")
    assert f.ids.shape == (8, 2 * k) and f.logp_base.dtype == torch.float32
    for ids, z in ((f.ids[:, :k], zb), (f.ids[:, k:], zr)):
        for row in finite:
            ref = torch.topk(z[row], min(k + 1, v))
            # largest first, the same values as torch.topk; the same set of ids unless a tie straddles the K-th place
            assert torch.equal(z[row, ids[row]], ref.values[:k])
            if k < v and ref.values[k - 1] > ref.values[k]:
                assert set(ids[row].tolist()) == set(ref.indices[:k].tolist())
    # fp64 references: torch's fp32 log_softmax itself is off by up to 3e-5 at V = 152k
    lp_b, lp_r = torch.log_softmax(zb.double(), -1).float(), torch.log_softmax(zr.double(), -1).float()
    torch.testing.assert_close(f.logp_base[finite], lp_b[finite].gather(1, f.ids[finite]), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(f.logp_reward, lp_r.gather(1, f.ids), rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(f.lse_base, torch.logsumexp(zb.float(), -1), rtol=1e-6, atol=1e-5, equal_nan=True)

