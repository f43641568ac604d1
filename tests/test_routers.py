"""Several routers in one engine, without an engine: names, the row -> router bookkeeping, the grouped step, the
start-up checks of extra routers, and the HTTP layer's model names. Against a real engine: test_serving_routers.py."""

import json
import math

import numpy as np
import pytest
import torch

from taro_vllm import mix
from taro_vllm.router import RouterConfig, build_router
from taro_vllm.serving.args import alias_xargs, parse_model_aliases, taro_overrides
from taro_vllm.serving.options import options_or_default, parse_options, TaroDefaults
from taro_vllm.serving.routers import GroupedRouters, RouterSet, parse_router_specs
from taro_vllm.serving.rows import RowState


def random_router(seed: int, vocab: int = 300):
    torch.manual_seed(seed)
    r = build_router(RouterConfig(kind="topk", vocab_size=vocab, input_scale=1.0)).float()
    for p in r.parameters():
        torch.nn.init.normal_(p, std=0.05)
    return r.eval()


def test_router_flags_name_each_router_and_the_first_is_the_default():
    assert parse_router_specs(["/ckpt/math-router"]) == {"math-router": "/ckpt/math-router"}
    assert parse_router_specs(["math=/a", "code=/b"]) == {"math": "/a", "code": "/b"}
    assert parse_router_specs(["/weird/dir=x/ckpt"]) == {"ckpt": "/weird/dir=x/ckpt"}  # "=" inside a path
    with pytest.raises(ValueError, match="given twice"):
        parse_router_specs(["a=/x", "a=/y"])
    hf = taro_overrides({"taro_router": ["math=/a", "code=/b"], "taro_model_aliases": ["taro-base=base"]})
    assert hf["taro_router"] == "/a" and hf["taro_routers"] == {"math": "/a", "code": "/b"}
    assert hf["taro_model_aliases"] == {"taro-base": "base"}
    assert "taro_routers" not in taro_overrides({"taro_router": ["/ckpt/r"]})  # one unnamed router: as before


def test_model_aliases_stand_for_modes_and_bad_ones_are_refused_at_start_up():
    assert alias_xargs("fixed:0.3") == {"taro_mode": "fixed", "taro_alpha": 0.3}
    assert alias_xargs("router:code") == {"taro_mode": "router", "taro_router": "code"}
    for bad in ("fixed:1.5", "fixed:x", "sideways", "router:"):
        with pytest.raises(ValueError, match="model alias mode"):
            parse_model_aliases([f"a={bad}"])


def test_a_request_picks_a_router_by_name_only_in_router_mode():
    assert options_or_default({"taro_router": "code"}, TaroDefaults(mode="fixed", alpha=0.3))[0] != 0.3
    assert math.isnan(options_or_default({"taro_router": "code"}, TaroDefaults())[0])
    assert options_or_default({"taro_router": "code"}, TaroDefaults())[2] == "code"
    with pytest.raises(ValueError, match="only valid with taro_mode"):
        parse_options({"taro_router": "code", "taro_mode": "base"})
    with pytest.raises(ValueError, match="router name"):
        parse_options({"taro_router": "../etc"})


def test_rows_using_several_routers_each_get_their_own_routers_weight():
    zb, zr = torch.randn(6, 300) * 3, torch.randn(6, 300) * 3
    routers = RouterSet("a", random_router(0))
    routers.add("b", random_router(1))
    routers.add("c", random_router(2))
    rows = RowState(8)
    rows.router_slot_for = routers.slot
    # rows 0..5: a, b, fixed 0.3, c, b, a
    for i, (w, name) in enumerate([(math.nan, "a"), (math.nan, "b"), (0.3, None), (math.nan, "c"), (math.nan, "b"),
                                   (math.nan, "a")]):
        rows.set_row(i, w, None, rows.router_slot_for(name))
    rows.begin_step(6)
    step = rows.take(6)
    assert step.needs_router and [s for s, _ in step.groups] == [0, 1, 2]
    res = mix.route_and_mix(zb, zr, router=GroupedRouters(routers, step.groups), override=step.override,
                            needs_router=step.needs_router)
    for i, name in [(0, "a"), (1, "b"), (3, "c"), (4, "b"), (5, "a")]:
        alone = routers.module(routers.slot(name)).weight(zb[i:i + 1], zr[i:i + 1]).alpha
        torch.testing.assert_close(res.alpha[i:i + 1], alone, rtol=0, atol=1e-6)
    assert res.alpha[2] == 0.3
    torch.testing.assert_close(res.logits, mix.mix_reference(zb, zr, res.alpha))


def test_one_router_steps_take_the_plain_path_and_rows_keep_their_router_when_moved():
    rows = RowState(4)
    rows.router_slot_for = {"b": 1}.get
    rows.set_row(0, math.nan, None, 0)
    rows.set_row(1, 0.5, None, 0)
    rows.begin_step(2)
    assert rows.take(2).groups is None  # only the default router: no grouping, the single-router path
    rows.set_row(2, math.nan, None, 1)
    rows.move(2, 0, swap=True)
    rows.begin_step(3)
    (g0, idx0), (g1, idx1) = rows.take(3).groups
    assert (g0, idx0.tolist(), g1, idx1.tolist()) == (0, [2], 1, [0])


def test_an_unloaded_router_leaves_an_empty_slot_and_the_default_cannot_go():
    routers = RouterSet("a", random_router(0))
    slot = routers.add("b", random_router(1))
    routers.remove("b")
    assert routers.slot("b") == -1 and routers.module(slot) is routers.modules[0]
    assert routers.add("b", random_router(2)) != slot  # slots are never reused
    with pytest.raises(ValueError, match="default router"):
        routers.remove("a")


def test_extra_routers_must_fit_the_engines_models(tiny_paths, tmp_path):
    from engine_utils import make_router

    from taro_vllm.pairing import TaroSetupError, validate_extra_router, validate_setup

    base, reward = tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]
    setup = validate_setup(base, make_router(tmp_path / "r1", base, reward), None)
    ok = validate_extra_router(setup, make_router(tmp_path / "r2", base, reward, seed=1))
    assert ok.reward_path == setup.reward_path
    other = make_router(tmp_path / "r3", base, base, seed=2)  # trained with another reward model
    with pytest.raises(TaroSetupError, match="all routers of one engine share its reward model"):
        validate_extra_router(setup, other)
    wrong_vocab = make_router(tmp_path / "r4", base, reward, vocab_size=1000)
    with pytest.raises(TaroSetupError, match="vocab_size"):
        validate_extra_router(setup, wrong_vocab)
    (tmp_path / "r5").mkdir()
    (tmp_path / "r5" / "config.json").write_text(json.dumps({"nonsense": 1}))
    with pytest.raises(TaroSetupError):
        validate_extra_router(setup, tmp_path / "r5")


def test_model_names_route_requests_and_unknown_routers_are_refused():
    from taro_vllm.serving.responses import AlphaFeed, BadRequest, Settings, plan_request

    async def read(keys, forget):
        return {}

    s = Settings(AlphaFeed(read), routers={"main": "/a", "code": "/b"}, default_router="main",
                 aliases={"taro-fixed-0.3": "fixed:0.3"}, base_model="taro")
    plan = plan_request({"model": "code", "prompt": "x"}, "/v1/completions", s)
    assert plan.body["model"] == "taro" and plan.body["vllm_xargs"] == {"taro_router": "code", "taro_mode": "router"}
    assert plan.model_alias == "code" and plan.router == "code"
    plan = plan_request({"model": "taro-fixed-0.3", "prompt": "x"}, "/v1/completions", s)
    assert plan.body["vllm_xargs"] == {"taro_mode": "fixed", "taro_alpha": 0.3} and plan.router is None
    assert plan_request({"model": "taro", "prompt": "x", "vllm_xargs": {"taro_mode": "base"}}, "/v1/completions",
                        s) is None
    with pytest.raises(BadRequest, match=r"not loaded on this server; loaded: \['code', 'main'\]"):
        plan_request({"model": "taro", "vllm_xargs": {"taro_router": "gone"}}, "/v1/completions", s)


def test_row_tables_stay_numpy():
    rows = RowState(2)
    rows.ensure(5)
    assert isinstance(rows.router_slot, np.ndarray) and rows.router_slot.shape == (5,)
