"""The router's feature cache: exact mixed NLL from a few numbers per row, and a router trained on it in seconds."""

from __future__ import annotations

import pytest
import torch

from router_training import feature_cache as fc
from router_training import onpolicy, tawp
from router_training.encoding import Encoder
from router_training.errors import TrainingSetupError
from router_training.router_fit import FitConfig, fit, fit_loop, fit_router_spec, router_alpha
from router_training.router_trainer import hf_logit_source, mixed_nll
from taro_vllm import mix
from taro_vllm.checkpoint import load_router
from test_training_router import HALF, chain_examples, synthetic_source


def _tiny_models(tiny_paths):
    from transformers import AutoModelForCausalLM

    load = lambda name: AutoModelForCausalLM.from_pretrained(str(tiny_paths[name]), dtype=torch.float32).eval()  # noqa
    return load("tiny-llama-base"), load("tiny-llama-reward")


def test_cached_nll_matches_the_full_vocabulary_nll(tmp_path, tiny_paths, tokenizer):
    base, reward = _tiny_models(tiny_paths)
    enc = Encoder(tokenizer, max_len=384)
    probs = tawp.make_splits({"router": 6})["router"]
    examples = [fc.Example(*enc.solution(s), tawp.context_words(s.prompt), group=s.group)
                for s in onpolicy.gold_solutions(probs)]
    src_b, src_r = hf_logit_source(base), hf_logit_source(reward)
    fc.build(tmp_path / "cache", src_b, src_r, examples, tokenizer, enc.pad_id, base.config.vocab_size,
             fc.CacheConfig(shard_sequences=4), batch_size=3, progress=False)
    rows, meta = fc.load(tmp_path / "cache")
    assert meta["shards"] == 2 and meta["vocab_size"] == base.config.vocab_size

    # The same rows from the full logits.
    zb_all, zr_all, y_all = [], [], []
    for e in examples:
        ids = torch.tensor([e.context + e.scored])
        zb = src_b(ids, torch.ones_like(ids))[0, len(e.context) - 1: -1]
        zr = src_r(ids, torch.ones_like(ids))[0, len(e.context) - 1: -1]
        zb_all.append(zb), zr_all.append(zr), y_all.append(torch.tensor(e.scored))
    zb, zr, y = torch.cat(zb_all), torch.cat(zr_all), torch.cat(y_all)
    assert torch.equal(rows["targets"], y)
    a = torch.rand(len(y), generator=torch.Generator().manual_seed(0))
    for alpha in (a, 0.0, 0.37, 1.0):
        full = mixed_nll(zb, zr, alpha if isinstance(alpha, torch.Tensor) else torch.full_like(a, alpha), y)
        assert torch.allclose(fc.cached_nll(rows, alpha), full, atol=1e-3), alpha
    # Router features in the cache are the serving path's features of the same logits.
    feats = mix.topk_features(zb, zr, 8, "both")
    assert torch.equal(rows["ids"], feats.ids) and torch.allclose(rows["lp_base"], feats.logp_base, atol=1e-5)
    # Token classes: digits of the gold lines, "=" and the EOS are all labelled.
    names = {fc.CLASSES[int(c)] for c in rows["cls"]}
    assert {"digits", "=", "operators", "eos"} <= names


class _Tok:
    eos_token_id = None

    def decode(self, ids):
        return "x"


@pytest.mark.parametrize("kind", ["topk", "full"])
def test_router_trained_on_the_cache_learns_where_to_trust_which_model(tmp_path, kind):
    """Synthetic models: the base is right before low ids, the reward before high ids; no fixed a does both. The
    full-logits router trains on a cache that kept the full log-prob rows (``full_rows``)."""
    ex = [fc.Example(c, s, group=f"g{i}") for i, (c, s) in enumerate(chain_examples(80, 12, seed=0))]
    fc.build(tmp_path / "cache", synthetic_source(True), synthetic_source(False), ex, _Tok(), 0, 32,
             fc.CacheConfig(k=4, full_rows=kind == "full"), progress=False)
    res = fit(FitConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "router"), other_weight=1.0,
                        router=fit_router_spec(kind=kind),
                        loop=fit_loop(max_steps=300, lr=3e-3, batch_size=256, eval_every=300, progress=False)))
    ev0, ev = res.report["eval_start"], res.report["eval"]
    assert abs(ev0["mean_a"] - 0.1) < 0.02  # starts near a = 0.1, not saturated
    assert ev["oracle_gain_over_best_fixed"] > 0.1 and res.report["gate_c"]["passed"]
    assert ev["nll_informative"] < ev["best_fixed_nll_informative"]  # beats every fixed a
    router, _ = load_router(tmp_path / "router")
    assert router.cfg.kind == kind
    rows, _ = fc.load(tmp_path / "cache")
    low = rows["targets"] < HALF
    with torch.no_grad():
        a = router_alpha(router, rows)
        assert a[low].mean() < 0.3 < 0.7 < a[~low].mean()
        if kind == "full":
            # What the served router computes from the raw logits: the cached rows differ only by fp16 rounding.
            ids = torch.tensor([[c[0]] + s for c, s in chain_examples(4, 12, seed=0)])
            zb = synthetic_source(True)(ids, torch.ones_like(ids))[:, :-1].reshape(-1, 32)
            zr = synthetic_source(False)(ids, torch.ones_like(ids))[:, :-1].reshape(-1, 32)
            assert torch.allclose(router(zb, zr), a[: len(zb)], atol=2e-3)


def test_a_full_logits_router_needs_a_cache_with_full_rows(tmp_path):
    ex = [fc.Example(c, s, group=f"g{i}") for i, (c, s) in enumerate(chain_examples(8, 4, seed=0))]
    fc.build(tmp_path / "cache", synthetic_source(True), synthetic_source(False), ex, _Tok(), 0, 32,
             fc.CacheConfig(k=4), progress=False)
    with pytest.raises(TrainingSetupError, match="--full-rows"):
        fit(FitConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / "router"), router=fit_router_spec(kind="full"),
                      loop=fit_loop(max_steps=2, progress=False)))
