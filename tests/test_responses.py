"""a_t in the responses (taro_vllm/serving/responses.py) without an engine: the middleware in front of a stand-in for
vLLM's completions endpoint that records a_t in the real AlphaRecorder right before it sends each token, as the
engine does. The same features against the real server: tests/test_serving_alphas.py."""

import asyncio
import json

import pytest
import torch

from taro_vllm.serving.alphas import AlphaRecorder
from taro_vllm.serving.responses import AlphaFeed, ReturnAlphas, Settings


def a_t(choice: int, step: int) -> float:
    return (1 + 2 * choice) / 16 + step / 64  # exact in fp32, as the recorder stores them


def logprob(model: str, choice: int, step: int) -> float:
    return -(1.0 if model == "base" else 2.0) - choice - step / 8


class FakeCompletions:
    """vLLM's /v1/completions in miniature: n choices of `tokens` tokens each, streamed one token per chunk (with
    return_token_ids, token ids in every chunk); records each token's a_t under the request's trace first (with
    taro_logprobs, a_t and the models' log-probs together, as the engine's sampler hook does)."""

    def __init__(self, recorder: AlphaRecorder, tokens: int = 5):
        self.recorder = recorder
        self.tokens = tokens
        self.bodies = []
        self.records_logprobs = True  # False: an engine whose sampler hook is missing (a_t only)

    async def __call__(self, scope, receive, send):
        body = json.loads((await receive())["body"])
        self.bodies.append(body)
        n, stream = body.get("n", 1), body.get("stream", False)
        trace = (body.get("vllm_xargs") or {}).get("taro_trace")
        logprobs = (body.get("vllm_xargs") or {}).get("taro_logprobs") and self.records_logprobs
        with_ids = body.get("return_token_ids", False)
        if stream:
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"content-type", b"text/event-stream")]})
        choices = [{"index": i, "text": "", **({"token_ids": []} if with_ids else {})} for i in range(n)]
        for step in range(self.tokens):
            for i in range(n):
                if trace and logprobs:
                    self.recorder.record_sampled([(trace, f"{i}_cmpl-1")], [a_t(i, step)],
                                                 [logprob("base", i, step)], [logprob("reward", i, step)])
                elif trace:
                    self.recorder.record(torch.tensor([a_t(i, step)]), [(trace, f"{i}_cmpl-1")])
                tok = 100 * i + step
                if stream:
                    chunk = {"id": "cmpl-1", "object": "text_completion", "created": 1, "model": "taro",
                             "choices": [{"index": i, "text": f"t{tok} ", **({"token_ids": [tok]} if with_ids
                                                                                else {})}]}
                    await send({"type": "http.response.body", "body": f"data: {json.dumps(chunk)}\n\n".encode(),
                                "more_body": True})
                    await asyncio.sleep(0)
                else:
                    choices[i]["text"] += f"t{tok} "
                    if with_ids:
                        choices[i]["token_ids"].append(tok)
        if stream:
            await send({"type": "http.response.body", "body": b"data: [DONE]\n\n", "more_body": False})
            return
        out = json.dumps({"id": "cmpl-1", "object": "text_completion", "choices": choices,
                          "usage": {"completion_tokens": n * self.tokens}}).encode()
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(out)).encode())]})
        await send({"type": "http.response.body", "body": out})


@pytest.fixture
def fake_server():
    recorder = AlphaRecorder()
    app = FakeCompletions(recorder)

    async def read(keys, forget):
        await asyncio.sleep(0)  # an RPC: other streams run meanwhile
        return recorder.read_new(keys, forget)

    settings = Settings(AlphaFeed(read), enabled=True, default_router="math-router", routers={"math-router": "/ckpt"})
    return ReturnAlphas(app, settings=lambda scope: settings), app, recorder, settings


async def apost(middleware, body: dict, path: str = "/v1/completions"):
    raw = json.dumps(body).encode()
    sent = []

    async def receive():
        return {"type": "http.request", "body": raw, "more_body": False}

    async def send(message):
        sent.append(message)

    scope = {"type": "http", "method": "POST", "path": path, "headers": [(b"content-length", b"%d" % len(raw))]}
    await middleware(scope, receive, send)
    return sent[0]["status"], b"".join(m.get("body", b"") for m in sent[1:])


def post(middleware, body: dict, path: str = "/v1/completions"):
    return asyncio.run(apost(middleware, body, path))


def sse_chunks(data: bytes) -> list:
    events = [e[len("data: "):] for e in data.decode().split("\n\n") if e.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


def test_each_choice_carries_the_a_t_of_its_tokens_and_the_summary_is_in_metrics(fake_server):
    middleware, app, recorder, _ = fake_server
    status, body = post(middleware, {"prompt": "hi", "n": 2, "vllm_xargs": {"taro_alphas": True}})
    out = json.loads(body)
    assert status == 200
    for c in out["choices"]:
        assert c["taro_alphas"] == [a_t(c["index"], s) for s in range(5)]
        assert "token_ids" not in c  # the client did not ask for them
        assert "taro_base_logprobs" not in c and "taro_reward_logprobs" not in c  # not asked for either
    every = [a_t(i, s) for i in range(2) for s in range(5)]
    assert out["metrics"]["taro"] == {"mode": "router", "router": "math-router", "num_tokens": 10,
                                      "mean_alpha": pytest.approx(sum(every) / 10),
                                      "share_alpha_above_half": 0.0}
    (private,) = recorder.traces  # the request's private trace; the engine drops it with the next read
    post(middleware, {"prompt": "hi", "vllm_xargs": {"taro_alphas": True}})
    assert private not in recorder.traces


def test_streamed_chunks_carry_their_tokens_a_t_and_concatenate_to_the_whole_list(fake_server):
    middleware, app, recorder, settings = fake_server
    status, body = post(middleware, {"prompt": "hi", "n": 2, "stream": True, "return_token_ids": True,
                                     "vllm_xargs": {"taro_alphas": True, "taro_trace": "mine"}})
    chunks = sse_chunks(body)
    per_choice = {0: [], 1: []}
    for chunk in chunks[:-1]:
        (c,) = chunk["choices"]
        assert len(c["taro_alphas"]) == len(c["token_ids"]) == 1  # kept: the client asked for token ids
        per_choice[c["index"]] += c["taro_alphas"]
    assert per_choice == {i: [a_t(i, s) for s in range(5)] for i in (0, 1)}
    summary = chunks[-1]
    assert summary["choices"] == [] and summary["metrics"]["taro"]["num_tokens"] == 10
    # The client's own taro_trace: the trace endpoint still has the whole thing.
    assert recorder.pop("mine") == [per_choice[0], per_choice[1]]


def test_requests_without_the_opt_in_pass_through_untouched(fake_server):
    middleware, app, recorder, _ = fake_server
    body = {"prompt": "hi", "max_tokens": 3, "vllm_xargs": {"taro_alpha": 0.3}}
    status, out = post(middleware, body)
    assert status == 200 and app.bodies[-1] == body
    assert "taro_alphas" not in out.decode() and "metrics" not in json.loads(out)


def test_the_request_asks_vllm_for_token_ids_under_a_trace(fake_server):
    middleware, app, _, _ = fake_server
    post(middleware, {"prompt": "hi", "vllm_xargs": {"taro_alphas": True, "taro_mode": "fixed", "taro_alpha": 0.3}})
    sent = app.bodies[-1]
    assert sent["return_token_ids"] is True and sent["vllm_xargs"]["taro_trace"].startswith("taro-response-")
    assert sent["vllm_xargs"]["taro_alpha"] == 0.3


@pytest.mark.parametrize("body,enabled,msg", [
    ({"prompt": "hi", "vllm_xargs": {"taro_alphas": True}}, False, "--taro-return-alphas"),
    ({"prompt": ["a", "b"], "vllm_xargs": {"taro_alphas": True}}, True, "one prompt per request"),
])
def test_what_cannot_be_answered_is_a_400(fake_server, body, enabled, msg):
    middleware, app, _, settings = fake_server
    settings.enabled = enabled
    n_before = len(app.bodies)
    status, out = post(middleware, body)
    assert status == 400 and msg in json.loads(out)["error"]["message"]
    assert len(app.bodies) == n_before  # never reached vLLM


def test_a_missing_a_t_is_null_and_counted_not_invented(fake_server):
    middleware, app, recorder, _ = fake_server
    app.tokens = 3
    original = recorder.record
    recorder.record = lambda alpha, trace, *a: None  # an engine that records nothing
    try:
        status, body = post(middleware, {"prompt": "hi", "vllm_xargs": {"taro_alphas": True}})
    finally:
        recorder.record = original
    out = json.loads(body)
    assert out["choices"][0]["taro_alphas"] is None
    assert out["metrics"]["taro"]["tokens_without_alpha"] == 3 and out["metrics"]["taro"]["mean_alpha"] is None


def test_concurrent_streams_share_reads_and_each_gets_its_own_a_t(fake_server):
    middleware, app, recorder, settings = fake_server
    body = {"prompt": "hi", "stream": True, "vllm_xargs": {"taro_alphas": True}}

    async def run():
        return await asyncio.gather(*(apost(middleware, body) for _ in range(8)))

    for status, out in asyncio.run(run()):
        chunks = sse_chunks(out)
        assert [a for c in chunks[:-1] for a in c["choices"][0]["taro_alphas"]] == [a_t(0, s) for s in range(5)]
    assert settings.feed.reads <= 8 * 5 // 2  # one read serves every stream waiting at that moment


# --- taro_logprobs: the base's and the reward's log-prob of each sampled token -----------------------------------


def test_with_taro_logprobs_each_choice_carries_three_aligned_lists(fake_server):
    middleware, app, recorder, _ = fake_server
    status, body = post(middleware, {"prompt": "hi", "n": 2,
                                     "vllm_xargs": {"taro_alphas": True, "taro_logprobs": True}})
    out = json.loads(body)
    assert status == 200 and app.bodies[-1]["vllm_xargs"]["taro_logprobs"] is True  # the engine is asked too
    for c in out["choices"]:
        i = c["index"]
        assert c["taro_alphas"] == [a_t(i, s) for s in range(5)]
        assert c["taro_base_logprobs"] == [logprob("base", i, s) for s in range(5)]
        assert c["taro_reward_logprobs"] == [logprob("reward", i, s) for s in range(5)]
    assert "tokens_without_logprobs" not in out["metrics"]["taro"]


def test_streamed_chunks_carry_the_logprobs_of_their_tokens(fake_server):
    middleware, app, recorder, _ = fake_server
    status, body = post(middleware, {"prompt": "hi", "n": 2, "stream": True, "vllm_xargs": {
        "taro_alphas": True, "taro_logprobs": True, "taro_trace": "lp-stream"}})
    streamed = {i: {"taro_alphas": [], "taro_base_logprobs": [], "taro_reward_logprobs": []} for i in (0, 1)}
    for chunk in sse_chunks(body)[:-1]:
        (c,) = chunk["choices"]
        assert len(c["taro_alphas"]) == len(c["taro_base_logprobs"]) == len(c["taro_reward_logprobs"]) == 1
        for name, values in streamed[c["index"]].items():
            values += c[name]
    for i in (0, 1):
        assert streamed[i]["taro_base_logprobs"] == [logprob("base", i, s) for s in range(5)]
        assert streamed[i]["taro_reward_logprobs"] == [logprob("reward", i, s) for s in range(5)]
    # The trace endpoint has them too, next to the a_t of each choice.
    choices = recorder.pop_trace("lp-stream")["choices"]
    assert [c["base_logprobs"] for c in choices] == [streamed[i]["taro_base_logprobs"] for i in (0, 1)]


def test_logprobs_the_engine_did_not_record_are_null_and_counted(fake_server):
    middleware, app, recorder, _ = fake_server
    app.records_logprobs = False  # e.g. a runner whose sampler could not be wrapped: a_t only
    status, body = post(middleware, {"prompt": "hi", "vllm_xargs": {"taro_alphas": True, "taro_logprobs": True}})
    (c,) = json.loads(body)["choices"]
    assert c["taro_alphas"] == [a_t(0, s) for s in range(5)]
    assert c["taro_base_logprobs"] is None and c["taro_reward_logprobs"] is None
    assert json.loads(body)["metrics"]["taro"]["tokens_without_logprobs"] == 5


# --- the feed's timing: reads are answered between engine steps ------------------------------------------------


class SteppedEngine:
    """An engine that records one token's a_t per step and answers the reads sent during a step at its end, after
    sending the step's tokens (vLLM's engine core serves utility calls between steps)."""

    def __init__(self, recorder: AlphaRecorder):
        self.recorder = recorder
        self.queued = []
        self.step = 0

    async def read(self, keys, forget):
        fut = asyncio.get_running_loop().create_future()
        self.queued.append((fut, keys, forget))
        return await fut

    async def run(self, tokens: asyncio.Queue, steps: int) -> None:
        for self.step in range(steps):
            self.recorder.record(torch.tensor([a_t(0, self.step)]), [("tr", "0_cmpl-1")])
            tokens.put_nowait(self.step)
            queued, self.queued = self.queued, []
            for fut, keys, forget in queued:
                fut.set_result(self.recorder.read_new(keys, forget))
            for _ in range(20):  # the step's compute: the API process runs meanwhile
                await asyncio.sleep(0)
        tokens.put_nowait(None)


@pytest.mark.parametrize("follow", [True, False])
def test_a_following_feed_has_each_steps_a_t_with_its_tokens(follow):
    """Without following, a chunk's read goes out after its tokens arrive and waits for the next step's end."""
    engine = SteppedEngine(AlphaRecorder())
    feed = AlphaFeed(engine.read, follow=follow)

    async def stream():
        feed.open("tr")
        tokens, waited = asyncio.Queue(), []
        runner = asyncio.ensure_future(engine.run(tokens, 6))
        while (t := await tokens.get()) is not None:
            got = await feed.take("tr", 0, t, 1)
            assert got == {"alphas": [a_t(0, t)]}
            waited.append(engine.step - t)  # engine steps a chunk waited for its a_t
        await runner
        feed.close("tr", forget=True)
        return waited

    waited = asyncio.run(stream())
    # The first chunk waits one step in both modes (the stream's first read goes out after its first token). Then,
    # following, no chunk waits; not following, every other one does (the read that ends its wait brings the next
    # step's a_t too).
    assert waited == ([1, 0, 0, 0, 0, 0] if follow else [1, 0, 1, 0, 1, 0])
