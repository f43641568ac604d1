"""The HTTP layer in front of vLLM's ``/v1/completions`` and ``/v1/chat/completions``: model names that stand for
routers or modes, and a_t in the responses themselves (per choice, in every streaming chunk, a per-request summary).

:class:`ReturnAlphas`, an ASGI middleware the ``taro_alphas`` endpoint plugin installs:

1. rewrites the request (:func:`plan_request`): a ``model`` naming a router (``--taro-router NAME=CKPT``) or a mode
   alias (``--taro-model-alias``) becomes the served model plus the matching ``vllm_xargs``; an unknown
   ``taro_router`` is a 400. A request with ``vllm_xargs: {"taro_alphas": true}`` (server flag
   ``--taro-return-alphas``) gets a trace id (its own ``taro_trace`` when set, so the trace endpoint still answers
   for it, else a private one) and ``return_token_ids``, which makes vLLM put in every choice and every chunk the ids
   of exactly the tokens it carries: that is what aligns a_t with tokens;
2. annotates the response (:class:`Annotator`): the model name the client used; each choice gets ``taro_alphas``,
   the a_t of its tokens, read from the engine by :class:`AlphaFeed` (one ``collective_rpc`` serves every stream
   waiting at that moment); the last message gets ``metrics.taro`` (mode, router, tokens, mean a, share of tokens
   with a > 0.5), vLLM's place for per-request summaries. Token ids the client did not ask for are removed again.
   With ``"taro_logprobs": true`` too, each choice also gets ``taro_base_logprobs`` and ``taro_reward_logprobs``:
   each model's own log-prob (log-softmax of its logits, before the mix) of each token sampled, recorded in the
   engine after the sampler (sampled.py) together with the a_t, so the three lists are aligned.

Everything else passes through untouched (a body without ``taro_`` or a router / alias name is not even parsed).
The engine side (recording a_t per traced row, ``taro_read_alphas``) is in alphas.py; loading routers in
routers_http.py.
"""

from __future__ import annotations

import asyncio
import json
import logging

import orjson
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger("taro_vllm")

ROUTES = ("/v1/completions", "/v1/chat/completions")
OPT_IN = "taro_alphas"
LOGPROBS_OPT_IN = "taro_logprobs"
# response field of each choice <- the recorder's name (alphas.py)
LOGPROB_FIELDS = {"taro_base_logprobs": "base_logprobs", "taro_reward_logprobs": "reward_logprobs"}
PRIVATE_TRACE_PREFIX = "taro-response-"

# Reads a_t recorded since the last read: (trace ids, traces to drop) ->
# {trace: {choice index (str): {"alphas": [a_t, ...], and when recorded "base_logprobs" / "reward_logprobs"}}}
ReadAlphas = Callable[[list[str], list[str]], Awaitable[dict[str, dict[str, dict[str, list]]]]]


class BadRequest(ValueError):
    """A request asking for a_t that this server cannot answer (HTTP 400)."""


class AlphaFeed:
    """The API process's view of the a_t the engine recorded for the responses in flight.

    A response waits in :meth:`take` until the a_t of the tokens it is about to send have arrived. Those a_t were
    recorded before the engine sent the tokens, so a read issued after the tokens arrived always has them. Reads are
    shared: while one is in flight, every other waiting response waits for it, so a batch of streams costs one RPC per
    engine step, not one per stream.

    While a read brings new a_t for an open response, the next read is sent at once (``follow``): the engine answers
    reads between steps, so the answer to a read sent during step t comes with step t's tokens. Waiting for the
    tokens before asking would hold every chunk back by one engine step. A read that brings nothing new ends the
    chain (an idle engine is not polled).
    """

    def __init__(self, read: ReadAlphas, max_empty_reads: int = 4, forget_batch: int = 64, follow: bool = True):
        self._read = read
        self.follow = follow
        self.max_empty_reads = max_empty_reads
        self.forget_batch = forget_batch
        self._buffers: dict[str, dict[int, dict[str, list]]] = {}  # trace -> choice -> "alphas"/... -> values
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

    def _have(self, key: str, choice: int) -> dict[str, list]:
        return self._buffers.get(key, {}).get(choice, {})

    async def take(self, key: str, choice: int, start: int, count: int) -> dict[str, list] | None:
        """Tokens ``start .. start + count`` of one choice: ``{"alphas": [...]}``, plus ``base_logprobs`` and
        ``reward_logprobs`` when the engine recorded them; None if the engine never recorded these tokens."""
        empty = 0
        while True:
            have = self._have(key, choice)
            if len(have.get("alphas", ())) >= start + count:
                return {name: values[start:start + count] for name, values in have.items()}
            before = len(have.get("alphas", ()))
            try:
                await self._refresh()
            except Exception as e:  # noqa: BLE001 - engine gone: the tokens still go out, without a_t
                logger.error("TARo: could not read a_t from the engine (%s)", e)
                return None
            if len(self._have(key, choice).get("alphas", ())) == before:
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
        fresh = False
        for key, per_choice in got.items():
            buffers = self._buffers.get(key)
            if buffers is not None:
                fresh = fresh or any(entry.get("alphas") for entry in per_choice.values())
                for index, entry in per_choice.items():
                    buf = buffers.setdefault(int(index), {})
                    known = len(buf.get("alphas", ()))
                    for name, values in entry.items():
                        # a list that starts late (log-probs after a_t without them) stays aligned: null before
                        buf.setdefault(name, [None] * known).extend(values)
        if self.follow and fresh and self._buffers:
            self._inflight = asyncio.ensure_future(self._read_once())
            # Nobody may await a read sent ahead: its failure is logged by the next take that needs it, or dropped.
            self._inflight.add_done_callback(lambda f: f.cancelled() or f.exception())


@dataclass
class Plan:
    """One request this layer changes: its rewritten body and what its response needs."""

    body: dict[str, Any]
    alphas: bool  # a_t asked for (vllm_xargs.taro_alphas)
    logprobs: bool = False  # the models' log-probs of each sampled token asked for too (vllm_xargs.taro_logprobs)
    key: str | None = None  # the trace id the engine records a_t under
    private: bool = False  # the key is ours (dropped in the engine afterwards), not the client's taro_trace
    wants_token_ids: bool = False  # the client asked for return_token_ids itself
    model_alias: str | None = None  # the model name the client used (a router or alias), restored in the response
    router: str | None = None  # the named router this request uses (counted while in flight: no unload meanwhile)
    summary_base: dict[str, Any] = field(default_factory=dict)  # mode / router of the metrics summary
    sent: dict[int, int] = field(default_factory=dict)  # choice index -> tokens annotated so far
    values: list[float] = field(default_factory=list)  # every a_t sent, for the summary
    missing: int = 0  # tokens whose a_t the engine did not have
    missing_logprobs: int = 0  # tokens (of a taro_logprobs request) whose log-probs the engine did not have


def _prompt_count(prompt: Any) -> int:
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
        return len(prompt)
    return 1


def plan_request(body: Any, path: str, settings: "Settings") -> Plan | None:
    """The rewrite of a request (None: it needs none; vLLM answers it as it is).

    * ``"model"`` naming a router or a mode alias: the served model, with the router / mode put in vllm_xargs;
    * ``vllm_xargs.taro_router`` must name a loaded router (else 400, listing them);
    * ``vllm_xargs.taro_alphas``: a trace and the token ids that align a_t with tokens (``taro_logprobs`` rides
      on the same trace; without ``taro_alphas`` vLLM's options validator refuses it, HTTP 400).
    """
    if not isinstance(body, dict):
        return None
    xargs = body.get("vllm_xargs")
    xargs = dict(xargs) if isinstance(xargs, dict) else ({} if xargs is None else None)
    if xargs is None:
        return None  # not an object: vLLM refuses it
    model = body.get("model")
    alias = None
    if isinstance(model, str) and model in settings.routers and model != settings.base_model:
        alias, xargs = model, {**xargs, "taro_router": model}
        xargs.setdefault("taro_mode", "router")
    elif isinstance(model, str) and model in settings.aliases:
        from taro_vllm.serving.args import alias_xargs

        alias, xargs = model, {**xargs, **alias_xargs(settings.aliases[model])}
    router = xargs.get("taro_router")
    if isinstance(router, str) and router not in settings.routers:
        raise BadRequest(f"taro_router {router!r} is not loaded on this server; loaded: {sorted(settings.routers)}")
    wants_alphas = xargs.get(OPT_IN) is True  # a non-boolean is refused by the options validator (HTTP 400)
    if alias is None and not wants_alphas and not isinstance(router, str):
        return None
    new_body = {**body, "vllm_xargs": xargs}
    plan = Plan(new_body, wants_alphas, model_alias=alias,
                router=router if isinstance(router, str) and router != settings.default_router else None)
    if alias is not None:
        new_body["model"] = settings.base_model
    if not wants_alphas:
        return plan
    if not settings.enabled:
        raise BadRequest("this server does not return a_t in responses: start it with --taro-return-alphas "
                         "(GET /v1/taro/alphas/{taro_trace} works without it)")
    if path == "/v1/completions" and _prompt_count(body.get("prompt")) > 1:
        raise BadRequest(f"taro_alphas takes one prompt per request; this one has {_prompt_count(body['prompt'])} "
                         "(send them as separate requests)")
    trace = xargs.get("taro_trace")
    if trace is not None and not isinstance(trace, str):
        return None  # vLLM's validator refuses the bad taro_trace (HTTP 400); never replace what the client sent
    plan.private = trace is None
    plan.logprobs = xargs.get(LOGPROBS_OPT_IN) is True
    plan.key = f"{PRIVATE_TRACE_PREFIX}{uuid.uuid4().hex}" if plan.private else trace
    mode = xargs.get("taro_mode") or ("fixed" if "taro_alpha" in xargs else settings.default_mode)
    plan.summary_base = {"mode": mode, "router": (router if isinstance(router, str) else settings.default_router)
                         if mode == "router" else None}
    if mode == "fixed":
        plan.summary_base["alpha"] = xargs.get("taro_alpha")
    new_body["vllm_xargs"] = {**xargs, "taro_trace": plan.key}
    new_body["return_token_ids"] = True
    plan.wants_token_ids = bool(body.get("return_token_ids"))
    return plan


class Annotator:
    """Adds a_t to the JSON objects of one response (the whole body, or one streaming chunk at a time)."""

    def __init__(self, plan: Plan, feed: AlphaFeed):
        self.plan = plan
        self.feed = feed

    async def choices(self, obj: dict[str, Any]) -> None:
        plan = self.plan
        if plan.model_alias is not None and "model" in obj:
            obj["model"] = plan.model_alias  # the name the client asked for, as vLLM does for its own names
        if not plan.alphas:
            return
        for choice in obj.get("choices") or ():
            ids = choice.get("token_ids")
            if not isinstance(ids, list):
                continue  # vLLM hid this choice's tokens (e.g. hidden reasoning): no a_t to align either
            index = int(choice.get("index", 0))
            start = plan.sent.get(index, 0)
            got = await self.feed.take(plan.key, index, start, len(ids))
            plan.sent[index] = start + len(ids)
            alphas = None if got is None else got["alphas"]
            if alphas is None:
                plan.missing += len(ids)
            else:
                plan.values.extend(alphas)
            choice[OPT_IN] = alphas
            if plan.logprobs:
                for name, recorded in LOGPROB_FIELDS.items():
                    choice[name] = None if got is None else got.get(recorded)
                if choice["taro_base_logprobs"] is None:
                    plan.missing_logprobs += len(ids)
            if not plan.wants_token_ids:
                choice.pop("token_ids", None)
                choice.pop("prompt_token_ids", None)
        if not plan.wants_token_ids:
            obj.pop("prompt_token_ids", None)

    def summary(self) -> dict[str, Any]:
        a = self.plan.values
        out = {**self.plan.summary_base, "num_tokens": len(a),
               "mean_alpha": sum(a) / len(a) if a else None,
               "share_alpha_above_half": sum(x > 0.5 for x in a) / len(a) if a else None}
        if self.plan.missing:
            out["tokens_without_alpha"] = self.plan.missing
        if self.plan.missing_logprobs:
            out["tokens_without_logprobs"] = self.plan.missing_logprobs
        return out

    def add_summary(self, obj: dict[str, Any]) -> None:
        if not self.plan.alphas:
            return
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
        if self.summarised or not self.last or not self.annotator.plan.alphas:
            return b""
        self.summarised = True
        chunk = {**self.last, "choices": []}
        self.annotator.add_summary(chunk)
        return b"data: " + orjson.dumps(chunk) + b"\n\n"

    async def _event(self, event: bytes) -> bytes:
        text = event.strip()
        if not text.startswith(b"data:"):
            return event + b"\n\n"
        payload = text[5:].strip()
        if payload == b"[DONE]":
            return self._summary_event() + event + b"\n\n"
        try:
            obj = orjson.loads(payload)  # every token's chunk passes here: the fast parser (vLLM depends on it)
        except ValueError:
            return event + b"\n\n"
        if not isinstance(obj, dict) or "error" in obj:
            return event + b"\n\n"
        self.last = {k: obj[k] for k in ("id", "object", "created", "model") if k in obj}
        await self.annotator.choices(obj)
        if not obj.get("choices") and "usage" in obj and obj.get("usage"):
            self.annotator.add_summary(obj)  # the usage chunk is the stream's last message: the summary rides on it
            self.summarised = True
        return b"data: " + orjson.dumps(obj) + b"\n\n"


@dataclass
class Settings:
    """What this layer knows of the running server (made by the endpoint plugin's ``init_state``)."""

    feed: AlphaFeed
    enabled: bool = False  # --taro-return-alphas
    default_mode: str = "router"
    default_router: str | None = None
    routers: dict[str, str] = field(default_factory=dict)  # loaded routers: name -> checkpoint
    aliases: dict[str, str] = field(default_factory=dict)  # --taro-model-alias: model name -> mode
    base_model: str | None = None  # the served model name requests are rewritten to
    in_flight: dict[str, int] = field(default_factory=dict)  # named router -> requests using it now

    def names(self) -> list[bytes]:
        """Model names this layer answers for (a body without any of them, and without "taro_", passes through)."""
        return [n.encode() for n in (*self.routers, *self.aliases)]

    @classmethod
    def for_engine(cls, engine_client) -> "Settings":
        """From the served model's config (the --taro-* flags arrive there as hf_overrides in every process)."""
        from taro_vllm.serving.args import parse_model_aliases
        from taro_vllm.serving.options import TaroDefaults
        from taro_vllm.serving.routers import served_routers

        hf = engine_client.model_config.hf_config

        async def read(keys: list[str], forget: list[str]) -> dict:
            merged: dict = {}
            for per_rank in await engine_client.collective_rpc("taro_read_alphas", args=(keys, forget)):
                for key, per_choice in (per_rank or {}).items():
                    merged.setdefault(key, per_choice)
            return merged

        routers = served_routers(hf)
        return cls(AlphaFeed(read), enabled=bool(getattr(hf, "taro_return_alphas", False)),
                   default_mode=TaroDefaults.from_hf_config(hf).mode, default_router=next(iter(routers), None),
                   routers=routers, aliases=parse_model_aliases(getattr(hf, "taro_model_aliases", None) or {}),
                   base_model=_first(engine_client.model_config.served_model_name))


def _first(name: str | list[str] | None) -> str | None:
    return name[0] if isinstance(name, list) and name else (name or None)


def openai_error(status: int, message: str, kind: str = "BadRequestError") -> dict:
    """The OpenAI error body every TARo HTTP error uses (vLLM's own shape)."""
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


def error_response(status: int, message: str, kind: str = "BadRequestError"):
    """:func:`openai_error` as a FastAPI response (the TARo routes)."""
    from fastapi.responses import JSONResponse

    return JSONResponse(openai_error(status, message, kind), status_code=status)


def _error(status: int, message: str) -> tuple[dict, bytes]:
    body = json.dumps(openai_error(status, message))
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
        settings = self.settings(scope)
        plan = None
        if settings is not None and (b"taro_" in body or any(n in body for n in settings.names())):
            try:
                plan = plan_request(json.loads(body), scope["path"], settings)
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
        if plan.alphas:
            settings.feed.open(plan.key)
        if plan.router:
            settings.in_flight[plan.router] = settings.in_flight.get(plan.router, 0) + 1
        try:
            await self.app(scope, _replay(new_body, disconnect, receive),
                           _AnnotatingSend(send, Annotator(plan, settings.feed)))
        finally:
            if plan.alphas:
                settings.feed.close(plan.key, forget=plan.private)
            if plan.router:
                settings.in_flight[plan.router] -= 1


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
