import pytest
import torch

from taro_vllm.router import FullRouter, RouterConfig, TopKRouter, build_router

V = 1000


def logits(n=4, v=V, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, v, generator=g) * 4).to(dtype), (torch.randn(n, v, generator=g) * 4).to(dtype)


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
