"""TARo through vLLM's OpenAI server (`taro-vllm serve`, compiled, fp32) on 127.0.0.1, driven by the OpenAI SDK."""

import asyncio

import httpx
import pytest

from cli_utils import cli_in_process

pytestmark = pytest.mark.engine
MAX_TOKENS = 20


def complete_ids(client, prompt, xargs=None, **kw):
    r = client.completions.create(model="taro", prompt=prompt, max_tokens=MAX_TOKENS, temperature=0,
                                  extra_body={"vllm_xargs": xargs or {}, "ignore_eos": True,
                                              "return_token_ids": True}, **kw)
    return list(r.choices[0].token_ids)


def test_health_and_metrics(server, client):
    assert httpx.get(server + "/health").status_code == 200
    client.completions.create(model="taro", prompt="Step 1:", max_tokens=4)
    import time

    # The a_t histogram is read from the engine every 2 s: poll for it, within a bounded wait.
    deadline = time.monotonic() + 30
    while "taro_alpha_bucket" not in (metrics := httpx.get(server + "/metrics").text) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert "taro_alpha_bucket" in metrics and "vllm:" in metrics


def test_a0_and_a1_equal_stock_vllm_through_the_server(client, prompt_ids, reference, pair):
    for i, p in enumerate(prompt_ids):
        assert complete_ids(client, p, {"taro_mode": "base"}) == reference[str(pair[0])][i]["ids"]
        assert complete_ids(client, p, {"taro_alpha": 1.0}) == reference[str(pair[1])][i]["ids"]


def test_concurrent_requests_with_different_modes_equal_sequential(server, prompt_ids):
    from openai import AsyncOpenAI

    modes = [None, {"taro_mode": "base"}, {"taro_mode": "reward"}, {"taro_alpha": 0.5}] * 3
    jobs = [(prompt_ids[i % len(prompt_ids)], m) for i, m in enumerate(modes)]

    async def one(c, p, m):
        r = await c.completions.create(model="taro", prompt=p, max_tokens=MAX_TOKENS, temperature=0,
                                       extra_body={"vllm_xargs": m or {}, "ignore_eos": True,
                                                   "return_token_ids": True})
        return list(r.choices[0].token_ids)

    async def run(concurrent: bool):
        c = AsyncOpenAI(base_url=server + "/v1", api_key="none", max_retries=0)
        if concurrent:
            return await asyncio.gather(*(one(c, p, m) for p, m in jobs))
        return [await one(c, p, m) for p, m in jobs]

    assert asyncio.run(run(True)) == asyncio.run(run(False))


def test_streaming_chat_n_stop_seed_logprobs(client):
    stream = client.completions.create(model="taro", prompt="Step 1:", max_tokens=8, temperature=0, stream=True)
    pieces = [c.choices[0].text for c in stream]
    whole = client.completions.create(model="taro", prompt="Step 1:", max_tokens=8, temperature=0)
    assert "".join(pieces) == whole.choices[0].text and len(pieces) > 1

    chat = client.chat.completions.create(model="taro", messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=6, temperature=0, logprobs=True, top_logprobs=2,
                                          extra_body={"vllm_xargs": {"taro_mode": "fixed", "taro_alpha": 0.3}})
    lp = chat.choices[0].logprobs.content
    assert chat.choices[0].message.content and len(lp) == chat.usage.completion_tokens
    assert all(t.logprob <= 0 and len(t.top_logprobs) == 2 for t in lp)

    n = client.completions.create(model="taro", prompt="Step 1:", max_tokens=6, n=2, temperature=1.0, seed=3)
    again = client.completions.create(model="taro", prompt="Step 1:", max_tokens=6, n=2, temperature=1.0, seed=3)
    assert len(n.choices) == 2 and [c.text for c in n.choices] == [c.text for c in again.choices]

    full = client.completions.create(model="taro", prompt="Step 1:", max_tokens=12, temperature=0)
    stop_at = full.choices[0].text[3:8]
    stopped = client.completions.create(model="taro", prompt="Step 1:", max_tokens=12, temperature=0, stop=[stop_at])
    assert stopped.choices[0].finish_reason == "stop" and stop_at not in stopped.choices[0].text


def test_per_token_alphas_come_back_by_trace_id(client, server):
    r = client.completions.create(model="taro", prompt="Step 1:", max_tokens=7, temperature=0,
                                  extra_body={"vllm_xargs": {"taro_trace": "req-42"}, "ignore_eos": True})
    got = httpx.get(server + "/v1/taro/alphas/req-42")
    assert got.status_code == 200
    alphas = got.json()["alphas"]
    assert len(alphas) == r.usage.completion_tokens == 7 and all(0 < a < 1 for a in alphas)
    assert httpx.get(server + "/v1/taro/alphas/req-42").status_code == 404  # returned once


@pytest.mark.parametrize("xargs,msg", [
    ({"taro_mode": "sideways"}, "taro_mode must be one of"),
    ({"taro_alpha": 1.5}, "taro_alpha must be in [0, 1]"),
    ({"taro_alpha": "0.5x"}, "taro_alpha must be a number"),
    ({"taro_mode": "fixed"}, "needs taro_alpha"),
])
def test_bad_taro_options_are_400_and_the_server_keeps_serving(server, xargs, msg):
    r = httpx.post(server + "/v1/completions", json={"model": "taro", "prompt": "hi", "max_tokens": 2,
                                                     "vllm_xargs": xargs})
    assert r.status_code == 400 and msg in r.json()["error"]["message"]
    ok = httpx.post(server + "/v1/completions", json={"model": "taro", "prompt": "hi", "max_tokens": 2})
    assert ok.status_code == 200


def test_vllm_serve_help_lists_the_taro_flags():
    out = cli_in_process("serve", "--help=TARo")
    assert out.returncode == 0, out.stderr[-2000:]
    assert "--taro-router" in out.stdout and "--taro-reward-model" in out.stdout, out.stderr[-2000:]
