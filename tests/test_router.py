import math

import pytest
import torch

from taro_vllm import mix
from taro_vllm.router import FullRouter, RouterConfig, TopKRouter, build_router

V = 1000


def logits(n=4, v=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 4).to(dtype), (torch.randn(n, v, generator=g) * 4).to(dtype)


def lm_like_logits(n, v, generator, peaks=4):
    """Logits shaped like an instruction-tuned LM's row: a few tokens at +10..+20, the rest N(0, 2**2)."""
    z = torch.randn(n, v, generator=generator) * 2.0
    for row in z:
        row[torch.randperm(v, generator=generator)[:peaks]] = 10 + 10 * torch.rand(peaks, generator=generator)
    return z


@pytest.mark.parametrize("kind", ["topk", "full"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_router_outputs_one_weight_in_0_1_per_row(kind, dtype):
    torch.manual_seed(0)
    router = build_router(RouterConfig(kind=kind, vocab_size=V)).to(dtype)
    for p in router.parameters():  # a random (not freshly zero-initialised) head
        torch.nn.init.normal_(p, std=0.05)
    zb, zr = logits(n=7, dtype=dtype)
    a = router(zb, zr)
    assert a.shape == (7,) and a.dtype == torch.float32
    assert bool(((a > 0) & (a < 1)).all())
    assert a.std() > 0  # depends on the row


def test_fresh_router_starts_at_sigmoid_of_init_bias():
    router = build_router(RouterConfig(vocab_size=V, init_bias=-2.0))
    a = router(*logits())
    torch.testing.assert_close(a, torch.full((4,), torch.sigmoid(torch.tensor(-2.0)).item()))


@pytest.mark.parametrize("kind", ["topk", "full"])
def test_untrained_router_starts_at_a_0_1(kind):
    # Mostly the base at the start, with room to move both ways (format 1 started at 0.5 and saturated).
    cfg = RouterConfig(kind=kind, vocab_size=V)
    assert cfg.init_bias == pytest.approx(math.log(0.1 / 0.9))
    a = build_router(cfg)(*logits(n=32, seed=3))
    assert abs(a.mean().item() - 0.1) <= 0.01


@pytest.mark.parametrize("kind", ["topk", "full"])
def test_first_layer_pre_activation_std_is_about_1_at_init(kind):
    """On LM-like rows over SmolLM2's 49152-token vocabulary, the first layer starts in SiLU's working range.

    Measured on these rows, before (format 1) -> after (format 2):
      topk: 2.90 -> 1.51  (top-K log-probs in [-50, 0] read as they are -> times input_scale = 0.1)
      full: 22.0 -> 1.10  (raw log-probs, row mean -18.3, each unit's offset |mean| 18.7 -> row-centred, times 0.1)
    On 42 real SmolLM2-135M-Instruct rows (a short Q/A prompt; the same model's next row as the "reward"):
      topk: 1.69 -> 0.88,  full: 24.9 -> 1.83.
    """
    vocab = 49152
    g = torch.Generator().manual_seed(1234)  # not 0: the router's init draws from seed 0
    zb, zr = lm_like_logits(16, vocab, g), lm_like_logits(16, vocab, g)
    torch.manual_seed(0)
    router = build_router(RouterConfig(kind=kind, vocab_size=vocab))
    with torch.no_grad():
        h = router.pre_activation(zb, zr)
    assert h.shape == (16, router.cfg.hidden_dim)
    assert 0.3 <= h.std().item() <= 3.0, h.std().item()


def test_full_router_reads_which_model_is_more_peaked_not_the_shared_level():
    # Row-centring drops the level both log-prob vectors share, keeps their difference.
    torch.manual_seed(0)
    router = build_router(RouterConfig(kind="full", vocab_size=V))
    torch.nn.init.normal_(router.mlp[-1].weight)
    lp_b, lp_r = mix.full_logprobs(*logits())
    a = router.forward_logprobs(lp_b, lp_r)
    torch.testing.assert_close(router.forward_logprobs(lp_b - 2.0, lp_r - 2.0), a, atol=1e-5, rtol=0)
    assert (router.forward_logprobs(lp_b - 2.0, lp_r) - a).abs().max() > 1e-3


def disagreement_batch(n, v, generator):
    """A base row and a reward row that agree on the top token, except in about half the rows."""
    zb = lm_like_logits(n, v, generator, peaks=1)
    zr = zb + 0.5 * torch.randn(n, v, generator=generator)
    disagree = torch.rand(n, generator=generator) < 0.5
    top_b = zb.argmax(-1)
    other = (top_b + 1 + torch.randint(v - 1, (n,), generator=generator)) % v
    rows = disagree.nonzero().squeeze(-1)
    zr[rows, other[rows]] = zr[rows, top_b[rows]] + 3.0
    assert torch.equal(zr.argmax(-1) != top_b, disagree)
    return zb, zr, disagree


@pytest.mark.parametrize("kind", ["topk", "full"])
def test_training_moves_a_where_the_models_disagree_without_saturating(kind):
    # Toy objective: a should be 0.8 where the reward model's top token differs from the base's, 0.05 elsewhere
    # (soft-target BCE, a fresh batch each step). 300 Adam steps at the trainer's lr 3e-3.
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1234)
    v = 512
    router = build_router(RouterConfig(kind=kind, vocab_size=v))
    opt = torch.optim.Adam(router.parameters(), lr=3e-3)
    mean_a = []
    for _ in range(300):
        zb, zr, disagree = disagreement_batch(64, v, g)
        a = router(zb, zr)
        loss = torch.nn.functional.binary_cross_entropy(a, torch.where(disagree, 0.8, 0.05))
        opt.zero_grad()
        loss.backward()
        opt.step()
        mean_a.append(a.mean().item())
    assert 0.01 < min(mean_a) and max(mean_a) < 0.99  # never saturated on the way
    zb, zr, disagree = disagreement_batch(512, v, g)
    with torch.no_grad():
        a = router(zb, zr)
    assert a[disagree].mean() > 0.6 and a[~disagree].mean() < 0.2, (a[disagree].mean(), a[~disagree].mean())


@pytest.mark.parametrize("source,slots", [("base", 8), ("reward", 8), ("both", 16)])
def test_topk_sources_select_k_or_2k_slots(source, slots):
    cfg = RouterConfig(vocab_size=V, k=8, source=source)
    assert cfg.slots == slots
    assert isinstance(build_router(cfg), TopKRouter)
    assert build_router(cfg).mlp[0].in_features == slots * (2 + cfg.embed_dim)


def test_topk_router_is_invariant_to_a_per_row_logit_shift():
    # Log-prob features: adding a constant to a model's logits (what a different base size may do) changes nothing.
    torch.manual_seed(0)
    router = build_router(RouterConfig(vocab_size=V))
    torch.nn.init.normal_(router.mlp[-1].weight)
    zb, zr = logits()
    torch.testing.assert_close(router(zb, zr), router(zb + 3.0, zr - 5.0), atol=1e-5, rtol=0)


def test_full_router_reads_both_full_vectors():
    router = build_router(RouterConfig(kind="full", vocab_size=V))
    assert isinstance(router, FullRouter)
    assert router.mlp[0].in_features == 2 * V


def test_config_rejects_nonsense():
    with pytest.raises(ValueError):
        RouterConfig(vocab_size=0)
    with pytest.raises(ValueError):
        RouterConfig(vocab_size=V, k=0)
    with pytest.raises(ValueError):
        RouterConfig(vocab_size=V, kind="mlp")
