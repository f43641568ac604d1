"""a_t in the responses of the real server (`taro-vllm serve --taro-return-alphas`, the session server of
conftest.py), read with the OpenAI SDK: per choice, in streaming chunks, with n > 1, and equal to the trace
endpoint's for the same request."""

import httpx
import pytest

pytestmark = pytest.mark.engine


def trace(server, trace_id):
    got = httpx.get(f"{server}/v1/taro/alphas/{trace_id}")
    assert got.status_code == 200, got.text
    return got.json()


def test_a_completion_carries_its_a_t_equal_to_the_trace_endpoint(client, server):
    r = client.completions.create(model="taro", prompt="Step 1:", max_tokens=9, temperature=0,
                                  extra_body={"ignore_eos": True,
                                              "vllm_xargs": {"taro_alphas": True, "taro_trace": "resp-1"}})
    alphas = r.choices[0].taro_alphas
    assert len(alphas) == r.usage.completion_tokens == 9 and all(0 < a < 1 for a in alphas)
    assert alphas == trace(server, "resp-1")["alphas"]
    summary = r.metrics["taro"]
    assert summary["num_tokens"] == 9 and summary["mode"] == "router"
    assert summary["mean_alpha"] == pytest.approx(sum(alphas) / 9)
    assert summary["share_alpha_above_half"] == sum(a > 0.5 for a in alphas) / 9
    assert not hasattr(r.choices[0], "token_ids") or r.choices[0].token_ids is None  # not asked for


def test_streamed_chunks_carry_the_a_t_of_their_tokens(client, server):
    kw = dict(model="taro", prompt="Step 1:", max_tokens=9, temperature=0)
    stream = client.completions.create(**kw, stream=True, extra_body={
        "ignore_eos": True, "return_token_ids": True, "vllm_xargs": {"taro_alphas": True, "taro_trace": "resp-2"}})
    chunks = list(stream)
    token_chunks = [c for c in chunks if c.choices]
    assert len(token_chunks) > 1
    for c in token_chunks:
        assert len(c.choices[0].taro_alphas) == len(c.choices[0].token_ids)
    streamed = [a for c in token_chunks for a in c.choices[0].taro_alphas]
    assert streamed == trace(server, "resp-2")["alphas"]
    assert chunks[-1].metrics["taro"]["num_tokens"] == 9  # the summary rides on the last message
    whole = client.completions.create(**kw, extra_body={"ignore_eos": True, "vllm_xargs": {"taro_alphas": True}})
    assert whole.choices[0].taro_alphas == streamed  # greedy, sequential: the same tokens, the same a_t


def test_n_2_gives_one_list_per_choice(client, server):
    r = client.completions.create(model="taro", prompt="Step 1:", max_tokens=6, n=2, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True, "return_token_ids": True,
                                              "vllm_xargs": {"taro_alphas": True, "taro_trace": "resp-n2"}})
    recorded = {c["index"]: c["alphas"] for c in trace(server, "resp-n2")["choices"]}
    assert sorted(recorded) == [0, 1]
    for c in r.choices:
        assert len(c.taro_alphas) == len(c.token_ids) == 6 and c.taro_alphas == recorded[c.index]
    assert r.metrics["taro"]["num_tokens"] == 12


def test_chat_with_logprobs_streaming_and_not(client):
    kw = dict(model="taro", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=6, temperature=0,
              logprobs=True, top_logprobs=2)
    xargs = {"vllm_xargs": {"taro_alphas": True, "taro_mode": "fixed", "taro_alpha": 0.25}}
    chat = client.chat.completions.create(**kw, extra_body={"ignore_eos": True, **xargs})
    alphas = chat.choices[0].taro_alphas
    assert alphas == [0.25] * len(chat.choices[0].logprobs.content) == [0.25] * 6
    assert chat.metrics["taro"] == {"mode": "fixed", "router": None, "alpha": 0.25, "num_tokens": 6,
                                    "mean_alpha": 0.25, "share_alpha_above_half": 0.0}
    streamed = [a for c in client.chat.completions.create(**kw, stream=True, extra_body={"ignore_eos": True, **xargs})
                for ch in c.choices for a in (getattr(ch, "taro_alphas", None) or [])]
    assert streamed == alphas


def test_without_the_opt_in_responses_are_vllms_own(client):
    r = client.completions.create(model="taro", prompt="Step 1:", max_tokens=3, temperature=0)
    assert getattr(r.choices[0], "taro_alphas", None) is None and not getattr(r, "metrics", None)


# --- taro_logprobs: the base's and the reward's log-prob of each sampled token -----------------------------------

LOGPROBS = {"taro_alphas": True, "taro_logprobs": True}


def three_lists(choice):
    return choice.taro_alphas, choice.taro_base_logprobs, choice.taro_reward_logprobs


@pytest.mark.parametrize("mode,field", [("base", "taro_base_logprobs"), ("reward", "taro_reward_logprobs")])
def test_each_models_logprob_is_vllms_own_logprob_when_that_model_serves_alone(client, mode, field):
    """In base mode the mix is the base's logits, so vLLM's own logprobs of the sampled tokens are the base's: the
    log-softmax the sampler hook gathered must equal them (fp32 server); likewise in reward mode."""
    r = client.completions.create(model="taro", prompt="Step 1:", max_tokens=8, temperature=0, logprobs=1,
                                  extra_body={"ignore_eos": True,
                                              "vllm_xargs": {**LOGPROBS, "taro_mode": mode}})
    c = r.choices[0]
    alphas, base, reward = three_lists(c)
    assert len(alphas) == len(base) == len(reward) == r.usage.completion_tokens == 8
    assert alphas == [0.0 if mode == "base" else 1.0] * 8
    assert getattr(c, field) == pytest.approx(c.logprobs.token_logprobs, abs=1e-4)
    other = reward if mode == "base" else base
    assert all(x <= 0 for x in base + reward) and max(abs(a - b) for a, b in zip(base, reward)) > 1e-3
    assert other != pytest.approx(c.logprobs.token_logprobs, abs=1e-4)  # the other model: its own numbers


def test_chat_logprobs_in_base_mode_are_vllms_own(client):
    chat = client.chat.completions.create(
        model="taro", messages=[{"role": "user", "content": "What is 2+2?"}], max_tokens=6, temperature=0,
        logprobs=True, extra_body={"ignore_eos": True, "vllm_xargs": {**LOGPROBS, "taro_mode": "base"}})
    c = chat.choices[0]
    assert c.taro_base_logprobs == pytest.approx([t.logprob for t in c.logprobs.content], abs=1e-4)
    assert len(c.taro_alphas) == len(c.taro_reward_logprobs) == 6


def test_streamed_logprobs_concatenate_to_the_whole_responses(client):
    kw = dict(model="taro", prompt="Step 1:", max_tokens=9, temperature=0)
    body = {"ignore_eos": True, "return_token_ids": True, "vllm_xargs": LOGPROBS}
    whole = client.completions.create(**kw, extra_body=body).choices[0]
    assert len(whole.taro_base_logprobs) == len(whole.token_ids) == 9
    streamed = ([], [], [])
    for chunk in client.completions.create(**kw, stream=True, extra_body=body):
        for c in chunk.choices:
            lists = three_lists(c)
            assert len({len(x) for x in lists}) == 1 and len(lists[0]) == len(c.token_ids)
            for acc, part in zip(streamed, lists):
                acc += part
    assert streamed == three_lists(whole)  # greedy, sequential: the same tokens, the same numbers


def test_logprobs_with_n_2_give_three_lists_per_choice(client, server):
    r = client.completions.create(model="taro", prompt="Step 1:", max_tokens=6, n=2, temperature=1.0, seed=5,
                                  extra_body={"ignore_eos": True,
                                              "vllm_xargs": {**LOGPROBS, "taro_trace": "lp-n2"}})
    recorded = {c["index"]: c for c in trace(server, "lp-n2")["choices"]}
    assert sorted(c.index for c in r.choices) == sorted(recorded) == [0, 1]
    for c in r.choices:
        alphas, base, reward = three_lists(c)
        assert len(alphas) == len(base) == len(reward) == 6
        assert (base, reward) == (recorded[c.index]["base_logprobs"], recorded[c.index]["reward_logprobs"])
    assert r.choices[0].taro_base_logprobs != r.choices[1].taro_base_logprobs  # each choice its own tokens


def test_without_taro_logprobs_no_logprob_lists_appear(client):
    r = client.completions.create(model="taro", prompt="Step 1:", max_tokens=3, temperature=0,
                                  extra_body={"vllm_xargs": {"taro_alphas": True}})
    c = r.choices[0]
    assert len(c.taro_alphas) == 3
    assert getattr(c, "taro_base_logprobs", None) is None and getattr(c, "taro_reward_logprobs", None) is None
    assert "taro_base_logprobs" not in (c.model_extra or {})
    with pytest.raises(Exception, match='set "taro_alphas": true too'):  # the option alone is a 400
        client.completions.create(model="taro", prompt="Step 1:", max_tokens=3,
                                  extra_body={"vllm_xargs": {"taro_logprobs": True}})
