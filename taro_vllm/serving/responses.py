"""a_t in the OpenAI responses themselves: per choice, in every streaming chunk, and a per-request summary.

A request opts in with ``vllm_xargs: {"taro_alphas": true}`` on a server started with ``--taro-return-alphas``.
:class:`ReturnAlphas`, an ASGI middleware the ``taro_alphas`` endpoint plugin puts in front of vLLM's
``/v1/completions`` and ``/v1/chat/completions``, then:

1. rewrites the request (:func:`plan_request`): it gets a trace id (its own ``taro_trace`` when set, so the trace
   endpoint still answers for it, else a private one) and ``return_token_ids``, which makes vLLM put in every
   choice and every chunk the ids of exactly the tokens it carries: that is what aligns a_t with tokens;
2. annotates the response (:class:`Annotator`): each choice gets ``taro_alphas``, the a_t of its tokens, read from
   the engine by :class:`AlphaFeed` (one ``collective_rpc`` serves every stream waiting at that moment); the last
   message gets ``metrics.taro`` (mode, router, tokens, mean a, share of tokens with a > 0.5), vLLM's place for
   per-request summaries. Token ids the client did not ask for are removed again.

Everything else passes through untouched (a request body without the bytes ``taro_alphas`` is not even parsed).
The engine side (recording a_t per traced row, ``taro_read_alphas``) is in alphas.py.
"""

from __future__ import annotations

import asyncio
import json
import logging
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("taro_vllm")

ROUTES = ("/v1/completions", "/v1/chat/completions")
OPT_IN = "taro_alphas"
PRIVATE_TRACE_PREFIX = "taro-response-"

# Reads a_t recorded since the last read: (trace ids, traces to drop) -> {trace: {choice index (str): [a_t, ...]}}
ReadAlphas = Callable[[list[str], list[str]], Awaitable[dict[str, dict[str, list[float]]]]]


class BadRequest(ValueError):
    """A request asking for a_t that this server cannot answer (HTTP 400)."""


class AlphaFeed:
    """The API process's view of the a_t the engine recorded for the responses in flight.

    A response waits in :meth:`take` until the a_t of the tokens it is about to send have arrived. Those a_t were
    recorded before the engine sent the tokens, so a read issued after the tokens arrived always has them. Reads are
    shared: while one is in flight, every other waiting response waits for it, so a batch of streams costs one RPC per
    engine step, not one per stream.
    """

    def __init__(self, read: ReadAlphas, max_empty_reads: int = 4, forget_batch: int = 64):
        self._read = read
        self.max_empty_reads = max_empty_reads
        self.forget_batch = forget_batch
        self._buffers: dict[str, dict[int, list[float]]] = {}
        self._forget: list[str] = []
        self._inflight: asyncio.Future | None = None
        self.reads = 0

    def open(self, key: str) -> None:
        self._buffers[key] = {}

    def close(self, key: str, forget: bool) -> None:
        """Stop following a trace; ``forget`` also drops it in the engine (private traces) with the next read."""
        self._buffers.pop(key, None)
        if forget:
            self._forget.append(key)
            if len(self._forget) >= self.forget_batch and (self._inflight is None or self._inflight.done()):
                self._inflight = asyncio.ensure_future(self._read_once())

    async def take(self, key: str, choice: int, start: int, count: int) -> list[float] | None:
        """a_t of tokens ``start .. start + count`` of one choice; None if the engine never recorded them."""
        empty = 0
        while True:
            have = self._buffers.get(key, {}).get(choice, [])
            if len(have) >= start + count:
                return have[start:start + count]
            before = len(have)
            try:
                await self._refresh()
            except Exception as e:  # noqa: BLE001 - engine gone: the tokens still go out, without a_t
                logger.error("TARo: could not read a_t from the engine (%s)", e)
                return None
            if len(self._buffers.get(key, {}).get(choice, [])) == before:
                empty += 1  # the first read may have been sent before the tokens existed; more than a few: lost
                if empty >= self.max_empty_reads:
                    logger.error("TARo: the engine has no a_t for trace %r choice %d tokens %d..%d", key, choice,
                                 start, start + count)
                    return None

    async def _refresh(self) -> None:
        if self._inflight is None or self._inflight.done():
            self._inflight = asyncio.ensure_future(self._read_once())
        await asyncio.shield(self._inflight)

    async def _read_once(self) -> None:
        forget, self._forget = self._forget, []
        self.reads += 1
        got = await self._read(list(self._buffers), forget)
        for key, per_choice in got.items():
            buffers = self._buffers.get(key)
            if buffers is not None:
                for index, values in per_choice.items():
                    buffers.setdefault(int(index), []).extend(values)


@dataclass
class Plan:
    """One opted-in request: its rewritten body and what its response needs."""

    body: dict[str, Any]
    key: str  # the trace id the engine records under
    private: bool  # the key is ours (dropped in the engine afterwards), not the client's taro_trace
    wants_token_ids: bool  # the client asked for return_token_ids itself
    stream: bool
    summary_base: dict[str, Any]  # mode / router of the metrics summary
    sent: dict[int, int] = field(default_factory=dict)  # choice index -> tokens annotated so far
    alphas: list[float] = field(default_factory=list)  # every a_t sent, for the summary
    missing: int = 0  # tokens whose a_t the engine did not have


def _prompt_count(prompt: Any) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def plan_request(body: Any, path: str, *, enabled: bool, default_mode: str, router: str | None) -> Plan | None:
    """The rewrite of a request that asks for a_t (None: it does not; vLLM answers it as it is)."""
    xargs = body.get("vllm_xargs") if isinstance(body, dict) else None
    if not isinstance(xargs, dict) or xargs.get(OPT_IN) is not True:
        return None  # absent or false; a non-boolean is refused by the options validator with the other options
    if not enabled:
        raise BadRequest("this server does not return a_t in responses: start it with --taro-return-alphas "
                         "(GET /v1/taro/alphas/{taro_trace} works without it)")
    if path == "/v1/completions" and _prompt_count(body.get("prompt")) > 1:
        raise BadRequest(f"taro_alphas takes one prompt per request; this one has {_prompt_count(body['prompt'])} "
                         "(send them as separate requests)")
    trace = xargs.get("taro_trace")
    private = not isinstance(trace, str)
    key = f"{PRIVATE_TRACE_PREFIX}{uuid.uuid4().hex}" if private else trace
    mode = xargs.get("taro_mode") or ("fixed" if "taro_alpha" in xargs else default_mode)
    summary: dict[str, Any] = {"mode": mode, "router": router if mode == "router" else None}
    if mode == "fixed":
        summary["alpha"] = xargs.get("taro_alpha")
    new_body = {**body, "vllm_xargs": {**xargs, "taro_trace": key}, "return_token_ids": True}
    return Plan(new_body, key, private, bool(body.get("return_token_ids")), bool(body.get("stream")), summary)


class Annotator:
    """Adds a_t to the JSON objects of one response (the whole body, or one streaming chunk at a time)."""

    def __init__(self, plan: Plan, feed: AlphaFeed):
        self.plan = plan
        self.feed = feed

    async def choices(self, obj: dict[str, Any]) -> None:
        plan = self.plan
        for choice in obj.get("choices") or ():
            ids = choice.get("token_ids")
            if not isinstance(ids, list):
                continue  # vLLM hid this choice's tokens (e.g. hidden reasoning): no a_t to align either
            index = int(choice.get("index", 0))
            start = plan.sent.get(index, 0)
            alphas = await self.feed.take(plan.key, index, start, len(ids))
            plan.sent[index] = start + len(ids)
            if alphas is None:
                plan.missing += len(ids)
            else:
                plan.alphas.extend(alphas)
            choice[OPT_IN] = alphas
            if not plan.wants_token_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if not plan.wants_token_ids:
            obj.pop("prompt_token_ids", None)

    def summary(self) -> dict[str, Any]:
        a = self.plan.alphas
        out = {**self.plan.summary_base, "num_tokens": len(a),
               "mean_alpha": sum(a) / len(a) if a else None,
               "share_alpha_above_half": sum(x > 0.5 for x in a) / len(a) if a else None}
        if self.plan.missing:
            out["tokens_without_alpha"] = self.plan.missing
        return out

    def add_summary(self, obj: dict[str, Any]) -> None:
        metrics = obj.get("metrics")
        obj["metrics"] = {**(metrics if isinstance(metrics, dict) else {}), "taro": self.summary()}

    async def whole(self, obj: dict[str, Any]) -> dict[str, Any]:
        await self.choices(obj)
        self.add_summary(obj)
        return obj


class _SSE:
    """Server-sent events of one streamed response, annotated event by event."""

    def __init__(self, annotator: Annotator):
        self.annotator = annotator
        self.pending = b""
        self.last: dict[str, Any] = {}  # id/object/created/model of the last chunk, for the summary chunk
        self.summarised = False

    async def feed(self, data: bytes) -> bytes:
        self.pending += data
        out = []
        while b"\n\n" in self.pending:
            event, self.pending = self.pending.split(b"\n\n", 1)
            out.append(await self._event(event))
        return b"".join(out)

    async def finish(self) -> bytes:
        rest, self.pending = self.pending, b""
        return (await self._event(rest) if rest.strip() else b"") + self._summary_event()

    def _summary_event(self) -> bytes:
        if self.summarised or not self.last:
            return b""
        self.summarised = True
        chunk = {**self.last, "choices": []}
        self.annotator.add_summary(chunk)
        return b"data: " + json.dumps(chunk).encode() + b"\n\n"

    async def _event(self, event: bytes) -> bytes:
        text = event.strip()
        if not text.startswith(b"data:"):
            return event + b"\n\n"
        payload = text[5:].strip()
        if payload == b"[DONE]":
            return self._summary_event() + event + b"\n\n"
        try:
            obj = json.loads(payload)
        except ValueError:
            return event + b"\n\n"
        if not isinstance(obj, dict) or "error" in obj:
            return event + b"\n\n"
        self.last = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        await self.annotator.choices(obj)
        if not obj.get("choices") and "usage" in obj and obj.get("usage"):
            self.annotator.add_summary(obj)  # the usage chunk is the stream's last message: the summary rides on it
            self.summarised = True
        return b"data: " + json.dumps(obj).encode() + b"\n\n"


@dataclass
class Settings:
    """What the middleware needs from the running server (set by the endpoint plugin's ``init_state``)."""

    feed: AlphaFeed
    enabled: bool
    default_mode: str = "router"
    router: str | None = None

    @classmethod
    def for_engine(cls, engine_client) -> "Settings":
        """From the served model's config (the --taro-* flags arrive there as hf_overrides in every process)."""
        from pathlib import Path

        from taro_vllm.serving.options import TaroDefaults

        hf = engine_client.model_config.hf_config

        async def read(keys: list[str], forget: list[str]) -> dict:
            merged: dict = {}
            for per_rank in await engine_client.collective_rpc("taro_read_alphas", args=(keys, forget)):
                for key, per_choice in (per_rank or {}).items():
                    merged.setdefault(key, per_choice)
            return merged

        router = getattr(hf, "taro_router", None)
        return cls(AlphaFeed(read), enabled=bool(getattr(hf, "taro_return_alphas", False)),
                   default_mode=TaroDefaults.from_hf_config(hf).mode, router=Path(router).name if router else None)


def _error(status: int, message: str) -> tuple[dict, bytes]:
    body = json.dumps({"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}})
    return ({"type": "http.response.start", "status": status,
             "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]},
            body.encode())


class ReturnAlphas:
    """ASGI middleware: a_t into the responses of requests that ask for them (module docstring)."""

    def __init__(self, app, settings: Callable[[Any], Settings | None]):
        self.app = app
        self.settings = settings  # scope -> Settings (None: not initialised, pass everything through)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "POST" or scope.get("path") not in ROUTES:
            return await self.app(scope, receive, send)
        body, disconnect = await _read_body(receive)
        settings = self.settings(scope) if OPT_IN.encode() in body else None
        plan = None
        if settings is not None:
            try:
                plan = plan_request(json.loads(body), scope["path"], enabled=settings.enabled,
                                    default_mode=settings.default_mode, router=settings.router)
            except BadRequest as e:
                start, payload = _error(400, str(e))
                await send(start)
                await send({"type": "http.response.body", "body": payload})
                return
            except ValueError:
                plan = None  # not JSON: vLLM gives its own 400
        if plan is None:
            return await self.app(scope, _replay(body, disconnect, receive), send)
        new_body = json.dumps(plan.body).encode()
        headers = [(k, v) for k, v in scope.get("headers", []) if k.lower() != b"content-length"]
        scope = {**scope, "headers": headers + [(b"content-length", str(len(new_body)).encode())]}
        settings.feed.open(plan.key)
        try:
            await self.app(scope, _replay(new_body, disconnect, receive),
                           _AnnotatingSend(send, Annotator(plan, settings.feed)))
        finally:
            settings.feed.close(plan.key, forget=plan.private)


class _AnnotatingSend:
    """The ``send`` of one opted-in request: passes errors through, annotates 200 responses."""

    def __init__(self, send, annotator: Annotator):
        self.send = send
        self.annotator = annotator
        self.start: dict | None = None
        self.mode = "pass"  # "pass" (not 200), "json" (buffer the body), "sse" (event by event)
        self.body = b""
        self.sse: _SSE | None = None

    async def __call__(self, message):
        if message["type"] == "http.response.start":
            ctype = dict((k.lower(), v) for k, v in message.get("headers", [])).get(b"content-type", b"")
            if message["status"] != 200:
                self.mode = "pass"
            elif ctype.startswith(b"text/event-stream"):
                self.mode, self.sse = "sse", _SSE(self.annotator)
            else:
                self.mode, self.start = "json", message
                return
            return await self.send(message)
        if message["type"] != "http.response.body" or self.mode == "pass":
            return await self.send(message)
        more = message.get("more_body", False)
        if self.mode == "sse":
            data = await self.sse.feed(message.get("body", b""))
            if not more:
                data += await self.sse.finish()
            if data or not more:
                await self.send({"type": "http.response.body", "body": data, "more_body": more})
            return
        self.body += message.get("body", b"")
        if more:
            return
        try:
            out = json.dumps(await self.annotator.whole(json.loads(self.body))).encode()
        except ValueError:
            out = self.body  # not JSON after all: the client gets vLLM's bytes
        headers = [(k, v) for k, v in self.start.get("headers", []) if k.lower() != b"content-length"]
        await self.send({**self.start, "headers": headers + [(b"content-length", str(len(out)).encode())]})
        await self.send({"type": "http.response.body", "body": out})


async def _read_body(receive) -> tuple[bytes, dict | None]:
    chunks = []
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return b"".join(chunks), message
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), None


def _replay(body: bytes, disconnect: dict | None, receive):
    """A ``receive`` that hands the app the (possibly rewritten) body, then the client's own messages (vLLM listens
    for the disconnect that aborts a request whose client went away)."""
    sent = False

    async def replay():
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        if disconnect is not None:
            return disconnect
        return await receive()

    return replay
