"""Several routers in one server (the session server of conftest.py: routers "main" and "alt", aliases taro-base and
taro-fixed-0.3): picked by model name or vllm_xargs, listed in /v1/models, loaded and unloaded at run time."""

import httpx
import pytest

pytestmark = pytest.mark.engine


def run(client, model="taro", xargs=None, max_tokens=8):
    r = client.completions.create(model=model, prompt="Step 1:", max_tokens=max_tokens, temperature=0,
                                  extra_body={"ignore_eos": True, "return_token_ids": True,
                                              "vllm_xargs": {**(xargs or {}), "taro_alphas": True}})
    return r.model, list(r.choices[0].token_ids), r.choices[0].taro_alphas


def test_models_lists_each_router_and_alias_under_the_base(server):
    listed = {m["id"]: m for m in httpx.get(server + "/v1/models").json()["data"]}
    assert {"taro", "main", "alt", "taro-base", "taro-fixed-0.3"} <= set(listed)
    assert listed["alt"]["parent"] == "taro" and listed["alt"]["root"].endswith("alt-router")
    routers = httpx.get(server + "/v1/taro/routers").json()
    assert routers["default"] == "main" and [r["name"] for r in routers["routers"]] == ["main", "alt"]


def test_a_router_is_picked_by_model_name_or_by_xargs(client):
    model, ids, alphas = run(client, model="alt")
    assert model == "alt"  # the name the client asked for
    assert (ids, alphas) == run(client, xargs={"taro_router": "alt"})[1:]
    assert run(client)[1:] == run(client, model="main")[1:]  # the default is "main"
    assert max(abs(a - b) for a, b in zip(alphas, run(client, model="main")[2])) > 1e-3


def test_mode_aliases_are_model_names_for_clients_without_extra_body(client):
    assert run(client, model="taro-base")[1] == run(client, xargs={"taro_mode": "base"})[1]
    model, _, alphas = run(client, model="taro-fixed-0.3")
    assert model == "taro-fixed-0.3" and alphas == pytest.approx([0.3] * 8)


def test_an_unknown_router_is_a_400_naming_the_loaded_ones(server):
    r = httpx.post(server + "/v1/completions", json={"model": "taro", "prompt": "hi", "max_tokens": 2,
                                                     "vllm_xargs": {"taro_router": "nope"}})
    assert r.status_code == 400 and "['alt', 'main']" in r.json()["error"]["message"]


def test_routers_load_and_unload_at_run_time(server, client, tiny_paths, tmp_path):
    from engine_utils import make_router

    base, reward = tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]
    wrong = make_router(tmp_path / "wrong", base, base, seed=4)  # trained with another reward model
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{}")
    for path, msg in [(tmp_path / "missing", "does not exist"), (wrong, "share its reward model"),
                      (tmp_path / "broken", "config.json")]:
        r = httpx.post(server + "/v1/taro/routers", json={"name": "late", "path": str(path)}, timeout=60)
        assert r.status_code == 400 and msg in r.json()["error"]["message"], r.text
    assert run(client, max_tokens=3)[1]  # the engine serves on

    late = make_router(tmp_path / "late", base, reward, seed=5)
    r = httpx.post(server + "/v1/taro/routers", json={"name": "late", "path": str(late)}, timeout=60)
    assert r.status_code == 200, r.text
    assert "late" in {m["id"] for m in httpx.get(server + "/v1/models").json()["data"]}
    model, ids, alphas = run(client, model="late")
    assert model == "late" and len(alphas) == 8 and alphas != run(client, model="main")[2]
    assert httpx.post(server + "/v1/taro/routers", json={"name": "late", "path": str(late)}).status_code == 409
    assert httpx.delete(server + "/v1/taro/routers/main").status_code == 400  # the default stays
    assert httpx.delete(server + "/v1/taro/routers/late").status_code == 200
    assert httpx.delete(server + "/v1/taro/routers/late").status_code == 404
    gone = httpx.post(server + "/v1/completions", json={"model": "late", "prompt": "hi", "max_tokens": 2})
    assert gone.status_code == 404  # no longer a model name
