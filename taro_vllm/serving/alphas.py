"""a_t back to the client and to Prometheus.

* The model records, per step, the weight used for every row into this worker process's :data:`RECORDER`: an
  all-rows histogram (cheap: one ``histc`` over N numbers) and, only for requests that set ``taro_trace``, the
  per-token list, one per engine request: with ``n > 1`` each sample is its own engine request (vLLM's child id
  ``"{index}_{parent id}"``), so a trace holds one list per choice. Where the sampler is hooked (sampled.py), traced
  rows are recorded after it instead, only if they sampled a token (a prefill chunk that is not the prompt's last
  records nothing), and with the base's and the reward's log-prob of that token when asked (``taro_logprobs``):
  :meth:`AlphaRecorder.record_sampled`.
* :class:`TaroWorkerExtension` (``--worker-extension-cls``) exposes the recorder to ``collective_rpc``: a whole
  trace once (the trace endpoint), or what is new since the last read (``taro_read_alphas``: the HTTP layer,
  responses.py, puts a_t into responses while they stream).
* :class:`TaroAlphaEndpoint` (``vllm.endpoint_plugins`` entry point ``taro_alphas``) adds
  ``GET /v1/taro/alphas/{trace_id}`` to the OpenAI server, the live a_t page ``GET /taro`` (taro.html), the a_t of
  each token in the responses themselves (responses.py, ``--taro-return-alphas``), and exports the histogram as
  ``taro_alpha`` on ``/metrics``.
"""

import asyncio
import json
import logging
import math
import re
import threading
from collections import OrderedDict
from pathlib import Path

import torch

logger = logging.getLogger("taro_vllm")

BUCKETS = tuple(round(0.1 * i, 1) for i in range(1, 11))  # upper bounds 0.1 .. 1.0

_CHILD_ID = re.compile(r"^(\d+)_(.+)$")  # vLLM's ParentRequest.get_child_info: f"{index}_{parent request id}"


def choice_indices(request_ids: list) -> list[int]:
    """The choice index of each engine request of one trace (given in first-recorded order).

    vLLM fans a request with ``n > 1`` out into child requests ``"{index}_{parent id}"``; when every request of the
    trace is such a child of one parent, their indices are the choice indices. Otherwise (several prompts or
    requests sharing one trace id, or ids vLLM did not make) the requests are numbered in the order they were first
    recorded.
    """
    parsed = [_CHILD_ID.match(r) if isinstance(r, str) else None for r in request_ids]
    if all(parsed) and len({m.group(2) for m in parsed}) == 1:
        idx = [int(m.group(1)) for m in parsed]
        if len(set(idx)) == len(idx):
            return idx
    return list(range(len(request_ids)))


LOGPROB_FLOOR = -9999.0  # vLLM's own floor for -inf log-probs in its responses (JSON has no -inf)


def json_logprob(x: float) -> float | None:
    """A log-prob as JSON can carry it: -inf (the model masks the token) as vLLM's -9999.0, NaN (the model's logits
    were broken, alphas.py / model.py) as null."""
    if math.isnan(x):
        return None
    return max(x, LOGPROB_FLOOR)


class _Values(list):
    """One engine request's a_t list; ``base`` / ``reward`` hold the models' log-prob of each sampled token, one per
    a_t, when the request asked for them (else None)."""

    base: list | None = None
    reward: list | None = None

    def entry(self, start: int = 0) -> dict[str, list]:
        out = {"alphas": list(self[start:])}
        if self.base is not None:
            out["base_logprobs"] = self.base[start:]
            out["reward_logprobs"] = self.reward[start:]
        return out


class AlphaRecorder:
    """Per-process store of a_t: traces by id (bounded, oldest evicted) and a running histogram.

    The histogram, its count and sum and the non-finite row count are accumulated on the device the alphas live on
    and read back only by :meth:`stats` (the metrics poll), so recording a step costs no host-device sync unless a
    row is traced (then one copy of the step's weights to the host).

    A row's trace key is ``(trace id, engine request id)`` (or a bare trace id: request unknown); each trace keeps
    one list per engine request, so the ``n`` samples of one request are never interleaved.
    """

    def __init__(self, max_traces: int = 4096, max_tokens: int = 65536):
        self.max_traces = max_traces
        self.max_tokens = max_tokens
        self.traces: OrderedDict[str, dict[str | None, _Values]] = OrderedDict()  # trace -> request -> a_t
        self.read_upto: dict[str, dict[str | None, int]] = {}  # trace -> request -> entries already read
        self.bucket_counts = [0] * len(BUCKETS)
        self.count = 0
        self.total = 0.0
        self.nonfinite_rows = 0
        self._acc: torch.Tensor | None = None  # [len(BUCKETS) + 3]: bucket counts, count, sum, non-finite rows
        self.lock = threading.Lock()

    def record(self, alpha: torch.Tensor, trace: list | None, nonfinite_rows: torch.Tensor | None = None) -> None:
        a = alpha.detach().float()
        nb = len(BUCKETS)
        with self.lock:
            # A tensor made under inference_mode cannot be updated in place outside it (e.g. an engine step, then a
            # caller recording outside inference mode): fold it into the host totals and start a fresh one.
            if self._acc is not None and (self._acc.device != a.device or (
                    self._acc.is_inference() and not torch.is_inference_mode_enabled())):
                self._fold()
            if self._acc is None:
                self._acc = torch.zeros(nb + 3, dtype=torch.float64, device=a.device)
            finite = torch.isfinite(a)
            # histc ignores NaN and values outside [0, 1]; the weights used are in [0, 1] or NaN.
            self._acc[:nb] += torch.histc(a, bins=nb, min=0.0, max=1.0).double()
            self._acc[nb] += finite.sum()
            self._acc[nb + 1] += torch.where(finite, a, 0.0).sum().double()
            if nonfinite_rows is not None:
                self._acc[nb + 2] += nonfinite_rows.sum()
            if not trace or all(key is None for key in trace):
                return
            host = a.tolist()  # the one sync of a traced step
            for row, key in enumerate(trace):
                if key is None:
                    continue
                buf = self._values(key)
                if len(buf) < self.max_tokens:
                    buf.append(float(host[row]))
                    if buf.base is not None:  # a row of a trace that has log-probs elsewhere: unknown here
                        buf.base.append(None)
                        buf.reward.append(None)

    def record_sampled(self, keys: list, alphas: list[float], base: list, reward: list) -> None:
        """Traced rows after the sampler (sampled.py), only those that sampled a token: per row its trace key, its
        a_t and the base's and the reward's log-prob of the token sampled (host floats; a marker object where the
        row did not ask for them), appended together so the lists stay aligned. Not counted in the histogram again
        (``record`` counted every row)."""
        with self.lock:
            for key, a, b, r in zip(keys, alphas, base, reward):
                buf = self._values(key)
                if len(buf) >= self.max_tokens:
                    continue
                asked = isinstance(b, float)
                if asked and buf.base is None:
                    buf.base, buf.reward = [None] * len(buf), [None] * len(buf)  # a_t recorded without: unknown
                buf.append(float(a))
                if buf.base is not None:
                    buf.base.append(json_logprob(b) if asked else None)
                    buf.reward.append(json_logprob(r) if asked else None)

    def _values(self, key) -> _Values:
        """The list of a trace key ((trace, request) or a bare trace id), made (and the oldest trace evicted) when
        new. Caller holds the lock."""
        key, request = key if isinstance(key, tuple) else (key, None)
        per_request = self.traces.get(key)
        if per_request is None:
            per_request = self.traces[key] = {}
            while len(self.traces) > self.max_traces:
                self.read_upto.pop(self.traces.popitem(last=False)[0], None)
        buf = per_request.get(request)
        if buf is None:
            buf = per_request[request] = _Values()
        return buf

    def _fold(self) -> None:
        """Move the device accumulators into the host totals (caller holds the lock)."""
        if self._acc is None:
            return
        acc = self._acc.tolist()
        self._acc = None  # a fresh one at the next record (it may be an inference tensor: no in-place reset here)
        nb = len(BUCKETS)
        for i in range(nb):
            self.bucket_counts[i] += int(acc[i])
        self.count += int(acc[nb])
        self.total += acc[nb + 1]
        new_bad = int(acc[nb + 2])
        if new_bad:
            self.nonfinite_rows += new_bad
            logger.error("TARo: non-finite logits in %d row(s) since the last report; served from the finite model "
                         "alone (or ended the sequence when both were broken)", new_bad)

    def pop_trace(self, key: str) -> dict | None:
        """A trace, removed: ``{"alphas": [...]}`` when one request recorded it (``n = 1``, the shape it always had),
        ``{"choices": [{"index": i, "alphas": [...]}, ...]}`` (sorted by index) when several did (``n > 1``); with
        ``base_logprobs`` and ``reward_logprobs`` next to ``alphas`` when the request asked for them."""
        with self.lock:
            per_request = self.traces.pop(key, None)
            self.read_upto.pop(key, None)
        if per_request is None:
            return None
        if len(per_request) == 1:
            return next(iter(per_request.values())).entry()
        indices = choice_indices(list(per_request))
        return {"choices": sorted(({"index": i, **v.entry()} for i, v in zip(indices, per_request.values())),
                                  key=lambda c: c["index"])}

    def read_new(self, keys: list[str], forget: list[str] = ()) -> dict[str, dict[str, dict[str, list]]]:
        """What each trace recorded since the last ``read_new`` of it, by choice index (a string: the answer crosses
        process boundaries; traces with nothing new are left out): ``{"alphas": [...]}``, plus ``base_logprobs``
        and ``reward_logprobs`` when recorded. Then the ``forget`` traces are dropped. Reading does not remove: the
        trace endpoint still returns a whole trace that was read."""
        out: dict[str, dict[str, dict[str, list]]] = {}
        with self.lock:
            for key in keys:
                per_request = self.traces.get(key)
                if not per_request:
                    continue
                upto = self.read_upto.setdefault(key, {})
                new = {}
                for index, (request, values) in zip(choice_indices(list(per_request)), per_request.items()):
                    start = upto.get(request, 0)
                    if len(values) > start:
                        new[str(index)] = values.entry(start)
                        upto[request] = len(values)
                if new:
                    out[key] = new
            for key in forget:
                self.traces.pop(key, None)
                self.read_upto.pop(key, None)
        return out

    def pop(self, key: str) -> list[float] | list[list[float]] | None:
        """A trace's a_t, removed: one list for one request, a list per choice (in index order) for ``n > 1``."""
        out = self.pop_trace(key)
        if out is None:
            return None
        return out["alphas"] if "alphas" in out else [c["alphas"] for c in out["choices"]]

    def stats(self) -> dict:
        with self.lock:
            self._fold()
            return {"buckets": list(BUCKETS), "counts": list(self.bucket_counts), "count": self.count,
                    "sum": self.total, "nonfinite_rows": self.nonfinite_rows}


RECORDER = AlphaRecorder()


def _router_rpc() -> type:
    from taro_vllm.serving.routers_http import RouterRPC

    return RouterRPC


class TaroWorkerExtension(_router_rpc()):  # type: ignore[misc]
    """Mixed into vLLM's worker class (``--worker-extension-cls``) for ``collective_rpc`` calls (a_t here; loading
    and unloading routers: routers_http.RouterRPC)."""

    def taro_pop_alphas(self, trace_id: str) -> dict | None:
        return RECORDER.pop_trace(trace_id)

    def taro_read_alphas(self, keys: list[str], forget: list[str]) -> dict:
        return RECORDER.read_new(keys, forget)

    def taro_alpha_stats(self) -> dict:
        return RECORDER.stats()


def _prometheus_collector(snapshot: dict):
    from prometheus_client.core import CounterMetricFamily, HistogramMetricFamily

    class TaroCollector:
        def collect(self):
            s = snapshot.get("stats")
            if not s:
                return
            cum, buckets = 0, []
            for upper, c in zip(s["buckets"], s["counts"]):
                cum += c
                buckets.append((str(upper), cum))
            buckets[-1] = ("+Inf", s["count"])
            h = HistogramMetricFamily("taro_alpha", "TARo mixing weight a_t per sampled token (0 = base, 1 = reward)")
            h.add_metric([], buckets, sum_value=s["sum"])
            yield h
            c = CounterMetricFamily("taro_nonfinite_rows", "rows whose base or reward logits held NaN/inf")
            c.add_metric([], s["nonfinite_rows"])
            yield c

    return TaroCollector()


def _openai_style_http_errors(app) -> None:
    """Errors raised before vLLM's handlers run (e.g. a body that is not UTF-8) come back as FastAPI's
    ``{"detail": ...}``; give them the OpenAI error shape every other error has."""
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    from taro_vllm.serving.responses import openai_error

    async def handler(request, exc: HTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else json.dumps(exc.detail)
        kind = "BadRequestError" if exc.status_code == 400 else "HTTPError"
        return JSONResponse(openai_error(exc.status_code, detail, kind), status_code=exc.status_code,
                            headers=getattr(exc, "headers", None))

    app.add_exception_handler(HTTPException, handler)


class TaroAlphaEndpoint:
    """``vllm.endpoint_plugins`` entry: per-token a_t by trace id, and the ``taro_alpha`` Prometheus histogram."""

    name = "taro_alphas"
    required_tasks = ("generate",)
    poll_seconds = 2.0

    def __init__(self) -> None:
        self._snapshot: dict = {}
        self._task: asyncio.Task | None = None

    def attach_router(self, app) -> None:
        from fastapi import APIRouter, Request
        from fastapi.responses import HTMLResponse

        from taro_vllm.serving.responses import error_response

        router = APIRouter()

        @router.get("/v1/taro/alphas/{trace_id}")
        async def get_alphas(trace_id: str, request: Request):
            client = request.app.state.taro_engine_client
            if client is None:
                return error_response(503, "no engine", "ServiceUnavailable")
            per_rank = await client.collective_rpc("taro_pop_alphas", args=(trace_id,))
            found = next((r for r in per_rank if r is not None), None)
            if found is None:
                return error_response(404, f"no a_t recorded for taro_trace {trace_id!r} (unknown, or already "
                                           "fetched: each trace is returned once)", "NotFoundError")
            return {"trace_id": trace_id, **found}  # "alphas" (n = 1) or "choices" (n > 1)

        page = (Path(__file__).parent / "taro.html").read_text()

        @router.get("/taro", response_class=HTMLResponse, include_in_schema=False)
        async def live_alphas_page():
            return page  # the live a_t view (no external assets): streams a prompt, shades each token by its a_t

        from taro_vllm.serving import routers_http

        routers_http.attach(router, lambda request: getattr(request.app.state, "taro_responses", None))
        app.include_router(router)
        _openai_style_http_errors(app)
        from taro_vllm.serving.responses import ReturnAlphas

        app.add_middleware(ReturnAlphas, settings=lambda scope: getattr(scope["app"].state, "taro_responses", None))

    async def init_state(self, engine_client, state, args) -> None:
        state.taro_engine_client = engine_client
        if engine_client is None:
            return
        if getattr(engine_client.model_config.hf_config, "taro_router", None):
            from taro_vllm.serving.responses import Settings

            state.taro_responses = Settings.for_engine(engine_client)
        from vllm.v1.metrics.prometheus import get_prometheus_registry

        get_prometheus_registry().register(_prometheus_collector(self._snapshot))
        self._task = asyncio.get_running_loop().create_task(self._poll(engine_client))

    async def _poll(self, engine_client) -> None:
        while True:
            try:
                per_rank = await engine_client.collective_rpc("taro_alpha_stats")
                self._snapshot["stats"] = per_rank[0]
            except asyncio.CancelledError:
                raise
            except Exception:  # engine restarting or shutting down: keep the last snapshot
                pass
            await asyncio.sleep(self.poll_seconds)
