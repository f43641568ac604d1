"""General prompts for the router's "stay with the base" term, and the term itself (KL from base to mix)."""

from __future__ import annotations

import re

import pytest
import torch

from benchmarks import ood_tasks
from router_training import feature_cache as fc
from router_training import general
from router_training.encoding import Encoder
from router_training.errors import TrainingSetupError
from router_training.router_fit import FitConfig, fit, fit_loop
from router_training.router_trainer import hf_logit_source
from test_feature_cache import _Tok, _tiny_models
from test_training_router import chain_examples, synthetic_source


def test_general_prompts_are_disjoint_from_the_ood_evaluation():
    prompts = general.make_prompts(300)
    assert len(set(prompts)) == 300 and prompts == general.make_prompts(300)  # distinct, deterministic
    ood = ood_tasks.make_tasks(100)
    assert not set(prompts) & {t.instruction for t in ood}
    words = {w.lower() for p in prompts for w in re.findall(r"[A-Za-z]+", p)}
    assert not words & {w.lower() for w in ood_tasks.WORDS}  # not even the evaluation's words
    assert general.context_words("Write one short sentence about a kettle.") == ("kettle",)


def test_records_keep_each_distinct_answer_once_grouped_by_prompt():
    recs = general.records(["Name a color.", "Say hi."], [["Red.", " Red.", "Blue.", ""], ["Hi!"]])
    assert [(r.solution, r.group) for r in recs] == [("Red.", "general-0"), ("Blue.", "general-0"),
                                                      ("Hi!", "general-1")]
    assert {r.dataset for r in recs} == {"general"}


def test_general_prompts_are_encoded_as_the_ood_evaluation_prompts(tokenizer):
    from benchmarks.accuracy import chat_prompt_ids

    p = general.make_prompts(1)[0]
    assert Encoder(tokenizer).prompt_ids(p, general.DATASET) == chat_prompt_ids(tokenizer, p)


def test_cached_kl_to_base_matches_the_full_vocabulary_kl(tmp_path, tiny_paths, tokenizer):
    base, reward = _tiny_models(tiny_paths)
    enc = Encoder(tokenizer, max_len=256)
    recs = general.records(general.make_prompts(4), [["A tiger is a big cat."], ["Bonjour!"], ["Yes."], ["No."]])
    examples = [fc.Example(*enc.solution(r), group=r.group) for r in recs]
    src_b, src_r = hf_logit_source(base), hf_logit_source(reward)
    fc.build(tmp_path / "cache", src_b, src_r, examples, tokenizer, enc.pad_id, base.config.vocab_size,
             progress=False)
    rows, _ = fc.load(tmp_path / "cache")
    zb = torch.cat([src_b(torch.tensor([e.context + e.scored]), torch.ones(1, len(e.context) + len(e.scored),
                                                                          dtype=torch.long))[0, len(e.context) - 1:-1]
                    for e in examples])
    zr = torch.cat([src_r(torch.tensor([e.context + e.scored]), torch.ones(1, len(e.context) + len(e.scored),
                                                                          dtype=torch.long))[0, len(e.context) - 1:-1]
                    for e in examples])
    lp_b = torch.log_softmax(zb, -1)
    for alpha in (0.0, 0.3, 1.0, torch.rand(len(zb), generator=torch.Generator().manual_seed(0))):
        a = torch.as_tensor(alpha).expand(len(zb)) if not isinstance(alpha, torch.Tensor) else alpha
        lp_m = torch.log_softmax((1 - a)[:, None] * zb + a[:, None] * zr, -1)
        full = (lp_b.exp() * (lp_b - lp_m)).sum(-1)
        cached = fc.cached_kl_to_base(rows, alpha)
        # Exact on the support; the off-support mass is one lumped outcome, so the cache is a lower bound within
        # 1% here (random tiny models spread their mass far more than trained ones do).
        assert (cached <= full * (1 + 1e-5) + 1e-4).all() and ((full - cached) <= 0.01 * full + 1e-4).all(), alpha
    assert torch.equal(fc.cached_kl_to_base(rows, 0.0), torch.zeros(len(zb)))


def _caches(tmp_path, vocab=32):
    main = [fc.Example(c, s, group=f"g{i}") for i, (c, s) in enumerate(chain_examples(80, 12, seed=0))]
    gen = [fc.Example(c, s, group=f"general-{i}") for i, (c, s) in enumerate(chain_examples(40, 12, seed=5))]
    for name, ex in (("cache", main), ("general", gen)):
        fc.build(tmp_path / name, synthetic_source(True), synthetic_source(False), ex, _Tok(), 0, vocab,
                 fc.CacheConfig(k=4), progress=False)


def _fit(tmp_path, out, **kw):
    return fit(FitConfig(cache=str(tmp_path / "cache"), out=str(tmp_path / out), other_weight=1.0,
                         loop=fit_loop(max_steps=200, lr=3e-3, batch_size=256, eval_every=200, progress=False), **kw))


def test_the_general_term_pulls_a_toward_the_base_on_general_text(tmp_path):
    """The same synthetic models routed on in-domain chains; the general cache's text asks for the base alone."""
    _caches(tmp_path)
    plain = _fit(tmp_path, "plain")
    with_general = _fit(tmp_path, "general_router", general_cache=str(tmp_path / "general"), general_weight=5.0)
    assert "general" not in plain.report["eval"]
    g = with_general.report["eval"]["general"]
    assert with_general.report["general_train_rows"] > 0 and g["rows"] > 0
    # Without the term the router routes general text like in-domain text (a high where the reward model is
    # sharper); with it, a_t on general text falls, and so does the KL from the base.
    from router_training.router_fit import load_general, router_alpha, split_general

    _, val = split_general(*load_general(str(tmp_path / "general"), fc.load(tmp_path / "cache")[1]), 0.15, 0)
    a_plain = float(router_alpha(plain.router, val).mean())
    assert g["mean_a"] < 0.5 * a_plain
    assert g["kl"] < float(fc.cached_kl_to_base(val, router_alpha(plain.router, val)).mean())


def test_a_general_cache_of_other_models_is_refused(tmp_path):
    _caches(tmp_path)
    ex = [fc.Example(c, s, group="general-0") for c, s in chain_examples(4, 12, seed=6)]
    fc.build(tmp_path / "other", synthetic_source(True), synthetic_source(False), ex, _Tok(), 0, 33,
             fc.CacheConfig(k=4), progress=False)
    with pytest.raises(TrainingSetupError, match="vocab_size"):
        _fit(tmp_path, "r", general_cache=str(tmp_path / "other"))
