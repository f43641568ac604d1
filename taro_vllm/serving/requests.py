"""Per-request TARo options and the per-row override vector they become.

A request chooses how its tokens are mixed through ``vllm_xargs`` (OpenAI API ``extra_body``) or
``SamplingParams.extra_args``::

    {"taro_mode": "router"}                      the learned router (default)
    {"taro_mode": "fixed", "taro_alpha": 0.3}    one weight for every token (GenARM); taro_alpha alone implies fixed
    {"taro_mode": "base"}  /  {"taro_mode": "reward"}   one model alone (a = 0 / a = 1)
    {"taro_trace": "my-id"}                      record a_t per token; fetch with GET /v1/taro/alphas/my-id

Each running request owns a row of the batch; the model reads one override per row (NaN = use the router) inside
``compute_logits``, so the mix, the sampled token and the returned logprobs all agree. The rows are filled by the
runner-specific feeder: :class:`TaroLogitsProcessor` on vLLM's V1 model runner (CPU, or GPU with
``VLLM_USE_V2_MODEL_RUNNER=0``) and ``TaroModelState`` (model_state.py) on the V2 GPU runner. On both runners the
options are validated at admission by :meth:`TaroLogitsProcessor.validate_params` (HTTP 400).
"""

from __future__ import annotations

import logging
import math
import sys
import threading
from typing import Any, Literal

import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from taro_vllm.serving.args import MODES

logger = logging.getLogger("taro_vllm")

XARG_KEYS = ("taro_mode", "taro_alpha", "taro_trace")

# A traced row's key for the a_t recorder: (taro_trace, engine request id). The request id tells the n samples of one
# request apart (each is its own engine request); None when the runner did not say (then they share one list).
TraceKey = tuple[str, "str | None"]


class TaroRequestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    taro_mode: Literal["router", "fixed", "base", "reward"] | None = None
    taro_alpha: float | None = None
    taro_trace: str | None = None

    @field_validator("taro_alpha", mode="before")
    @classmethod
    def _alpha_is_a_number(cls, v: Any) -> Any:
        if v is None:
            return v
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError(f"taro_alpha must be a number in [0, 1], got {v!r}")
        if not (0.0 <= float(v) <= 1.0) or math.isnan(float(v)):
            raise ValueError(f"taro_alpha must be in [0, 1], got {v!r}")
        return float(v)

    @field_validator("taro_trace", mode="before")
    @classmethod
    def _trace_is_a_short_id(cls, v: Any) -> Any:
        if v is None:
            return v
        if not isinstance(v, str) or not (0 < len(v) <= 128) or not v.isprintable():
            raise ValueError("taro_trace must be a printable string of 1-128 characters")
        return v

    @model_validator(mode="after")
    def _mode_and_alpha_agree(self) -> "TaroRequestOptions":
        if self.taro_mode == "fixed" and self.taro_alpha is None:
            raise ValueError('taro_mode "fixed" needs taro_alpha in [0, 1]')
        if self.taro_mode in ("router", "base", "reward") and self.taro_alpha is not None:
            raise ValueError(f'taro_alpha is only valid with taro_mode "fixed", not "{self.taro_mode}"')
        return self

    def weight(self, default_mode: str = "router", default_alpha: float | None = None) -> float:
        """The row override: a weight in [0, 1], or NaN to use the router."""
        mode = self.taro_mode or ("fixed" if self.taro_alpha is not None else default_mode)
        if mode == "base":
            return 0.0
        if mode == "reward":
            return 1.0
        if mode == "fixed":
            a = self.taro_alpha if self.taro_alpha is not None else default_alpha
            if a is None:
                raise ValueError('taro_mode "fixed" needs taro_alpha')
            return float(a)
        return math.nan


def parse_options(extra_args: dict[str, Any] | None) -> TaroRequestOptions:
    """Read the taro_* keys of ``SamplingParams.extra_args``; ValueError (HTTP 400) with a readable message."""
    if not extra_args:
        return TaroRequestOptions()
    if not isinstance(extra_args, dict):
        raise ValueError("vllm_xargs must be an object")
    taro = {k: v for k, v in extra_args.items() if k.startswith("taro_")}
    unknown = sorted(set(taro) - set(XARG_KEYS))
    if unknown:
        raise ValueError(f"unknown TARo option(s) {unknown}; valid: {list(XARG_KEYS)}")
    if "taro_mode" in taro and taro["taro_mode"] not in MODES:
        raise ValueError(f"taro_mode must be one of {list(MODES)}, got {taro['taro_mode']!r}")
    try:
        return TaroRequestOptions(**taro)
    except ValidationError as e:
        msgs = "; ".join(err["msg"].removeprefix("Value error, ") for err in e.errors())
        raise ValueError(msgs) from None


def _pin_memory_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken CUDA install: pageable memory still works
        return False


class RowState:
    """Per-row TARo settings of the running batch, shared by the feeder and the model in one worker process.

    Where each piece lives (explicitly, whatever ``torch.device`` context the model is built under):

    * ``override`` - the feeder's per-row table, host numpy (the feeders write it row by row);
    * two staging buffers, host, pinned when CUDA is present - ``begin_step`` snapshots the step's rows into one of
      them (alternating, so a host write never races a copy still in flight from the step before);
    * the model's device buffer (on ``device``, or on the device of the logits when that differs) - ``take`` issues
      one non-blocking copy into it.

    ``begin_step`` is called by the feeder once per scheduler step, before the forward pass; it also computes, on
    the host, whether any row uses the router and whether any row is overridden, so the model never has to ask the
    device. The model consumes the step in the first ``compute_logits`` call whose row count matches (later calls
    in the same step, e.g. prompt logprobs, use the router and the server default only).
    """

    def __init__(self, max_rows: int, default_weight: float = math.nan, device: torch.device | str = "cpu"):
        self.default_weight = default_weight
        self.override = np.full((max_rows,), default_weight, dtype=np.float32)
        self.trace: list[TraceKey | None] = [None] * max_rows
        self.num_rows = 0
        self.fresh = False
        self.needs_router = math.isnan(default_weight)
        self.all_router = self.needs_router
        self.lock = threading.Lock()
        pin = _pin_memory_available()
        self._staging = [torch.full((max_rows,), default_weight, dtype=torch.float32, device="cpu", pin_memory=pin)
                         for _ in range(2)]
        self._staging_np = [t.numpy() for t in self._staging]  # host views, for writes without torch ops
        self._which = 0
        self.device = torch.device(device)
        self.device_override = torch.full((max_rows,), default_weight, dtype=torch.float32, device=self.device)

    def ensure(self, rows: int) -> None:
        if rows > self.override.shape[0]:
            extra = rows - self.override.shape[0]
            self.override = np.concatenate([self.override, np.full((extra,), self.default_weight, np.float32)])
            self.trace.extend([None] * extra)

    def set_row(self, i: int, weight: float, trace: TraceKey | None) -> None:
        self.ensure(i + 1)
        self.override[i] = weight
        self.trace[i] = trace

    def clear_row(self, i: int) -> None:
        self.set_row(i, self.default_weight, None)

    def move(self, src: int, dst: int, swap: bool) -> None:
        self.ensure(max(src, dst) + 1)
        if swap:
            self.override[[src, dst]] = self.override[[dst, src]]
            self.trace[src], self.trace[dst] = self.trace[dst], self.trace[src]
        else:
            self.override[dst] = self.override[src]
            self.trace[dst] = self.trace[src]

    def begin_step(self, num_rows: int) -> None:
        self.ensure(num_rows)
        self.num_rows = num_rows
        self.fresh = True
        self._which ^= 1
        if self._staging[self._which].numel() < num_rows:
            self._staging[self._which] = torch.empty((num_rows,), dtype=torch.float32, device="cpu",
                                                     pin_memory=_pin_memory_available())
            self._staging_np[self._which] = self._staging[self._which].numpy()
        w = self.override[:num_rows]
        self._staging_np[self._which][:num_rows] = w  # host memcpy
        nan = np.isnan(w)
        self.needs_router = bool(nan.any())
        self.all_router = bool(nan.all())

    def _device_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        if self.device_override.device != device or self.device_override.numel() < rows:
            self.device = device
            self.device_override = torch.full((max(rows, self.override.shape[0]),), self.default_weight,
                                              dtype=torch.float32, device=device)
        return self.device_override[:rows]

    def take(self, rows: int, device: torch.device | str = "cpu"
             ) -> tuple[torch.Tensor | None, list[TraceKey | None] | None, bool]:
        """Overrides on ``device`` (None when nothing is overridden), trace ids, and whether the router must run.

        Never reads from the device: the flags were computed on the host by ``begin_step``, and the overrides reach
        the device by one non-blocking copy from pinned memory. Trace ids are None for calls that are not a step's
        sampling call (warm-up, profiling, prompt logprobs): their a_t are not recorded.
        """
        device = torch.device(device)
        if not self.fresh or rows != self.num_rows:
            if math.isnan(self.default_weight):
                return None, None, True
            return torch.full((rows,), self.default_weight, dtype=torch.float32, device=device), None, False
        self.fresh = False
        trace = self.trace[:rows]
        if self.all_router:
            return None, trace, True
        dev = self._device_buffer(rows, device)
        dev.copy_(self._staging[self._which][:rows], non_blocking=True)
        return dev, trace, self.needs_router


# One engine per worker process; the model registers its RowState here and the feeder finds it.
_ROWS: dict[str, RowState] = {}


def register_rows(key: str, rows: RowState) -> None:
    _ROWS[key] = rows


def rows_for(key: str) -> RowState | None:
    return _ROWS.get(key)


def engine_key(vllm_config: Any) -> str:
    """Key shared by the model and the feeder of one engine (both get the same VllmConfig)."""
    return str(getattr(vllm_config.model_config, "model", ""))


def _processor_bases() -> tuple[type, ...]:
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

    return V1LogitsProcessor, V2LogitsProcessor


class TaroLogitsProcessor(*_processor_bases()):  # type: ignore[misc]
    """One class for both of vLLM's model runners, so nobody has to predict which one runs.

    * On the V1 runner (CPU, or GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) it is the feeder: it keeps the per-row
      overrides in step with the persistent batch (``update_state``).
    * On the V2 runner (the GPU default) ``TaroModelState`` feeds the rows; this class only validates ``taro_*``
      options at admission (vLLM's frontend builds its params validator from ``--logits-processors``, and the V2
      loader refuses V1-only classes). ``add_request`` returns False, so the sampler never copies logits for it.
    * ``validate_params`` (both runners) turns a bad option into a ``VLLMValidationError``: HTTP 400 online, a
      ``ValueError`` offline, before the request reaches the engine.

    Passed with ``--logits-processors taro_vllm.serving.requests:TaroLogitsProcessor`` (``taro-vllm serve``,
    ``vllm serve --taro-router`` and ``taro_llm`` add it; the model refuses to start without it). It is deliberately
    NOT registered as a ``vllm.logits_processors`` entry point: vLLM loads those for every model.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_options(sampling_params.extra_args)

    def __init__(self, vllm_config, *runner_args) -> None:
        # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, LogitsProcRequestState).
        hf = vllm_config.model_config.hf_config
        self.default_mode = getattr(hf, "taro_default_mode", None) or "router"
        self.default_alpha = getattr(hf, "taro_default_alpha", None)
        self.key = engine_key(vllm_config)
        self.rows: RowState | None = None

    def _rows(self) -> RowState | None:
        if self.rows is None:
            self.rows = rows_for(self.key)
        return self.rows

    # --- V2 interface: validation only ---------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False  # TaroModelState holds the per-request state; nothing to do to the sampler's logits

    def apply_staged_writes(self) -> None:
        pass

    # --- both -------------------------------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return logits  # the mix happened in compute_logits

    # --- V1 interface: the feeder -----------------------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        return True  # apply() changes nothing

    def update_state(self, batch_update) -> None:
        rows = self._rows()
        if rows is None:  # not a TARo engine: nothing to feed
            return
        with rows.lock:
            if batch_update is not None:
                for i in batch_update.removed:
                    rows.clear_row(i)
                traced = False
                for i, params, _prompt, _out in batch_update.added:
                    weight, trace = options_or_default(params.extra_args, self.default_mode, self.default_alpha,
                                                       rows.default_weight)
                    rows.set_row(i, weight, (trace, None) if trace is not None else None)
                    traced |= trace is not None
                from vllm.v1.sample.logits_processor import MoveDirectionality

                for src, dst, direction in batch_update.moved:
                    rows.move(src, dst, direction == MoveDirectionality.SWAP)
                if traced:
                    _name_traced_rows(rows, batch_update.batch_size)
                rows.begin_step(batch_update.batch_size)
            else:
                rows.begin_step(rows.num_rows)


def _v1_batch_req_ids() -> list | None:
    """The V1 runner's row -> request id list (``InputBatch.req_ids``), or None if it cannot be found.

    vLLM's V1 ``BatchUpdate`` gives a logits processor each added row's params but not its request id, and with
    ``n > 1`` the samples' params are identical (often the same object). ``InputBatch.refresh_metadata`` calls
    ``update_state`` with the batch already in its final row order, so the caller's ``_req_ids`` names every row.
    That is a vLLM internal, read by frame inspection (vllm 0.32); if an upgrade moves it, traces fall back to one
    list per trace id and ``tests/test_serving_llm.py::test_trace_with_n_gives_one_list_per_choice`` fails.
    """
    frame = sys._getframe(1)
    for _ in range(4):  # update_state's caller, tolerating a wrapper or two
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        req_ids = getattr(owner, "_req_ids", None)
        if isinstance(req_ids, list) and hasattr(owner, "batch_update_builder"):
            return req_ids
    return None


def _name_traced_rows(rows: RowState, batch_size: int) -> None:
    """Give newly added traced rows their engine request id (rows moved since keep theirs). Runs only in a step
    that admits a traced request; without the runner's ids the samples of an ``n > 1`` request share one list."""
    req_ids = _v1_batch_req_ids()
    if req_ids is None:
        logger.warning("TARo: cannot read the V1 runner's request ids; with n > 1 a taro_trace holds the samples' "
                       "a_t in one list")
        return
    for i in range(min(batch_size, len(req_ids))):
        key = rows.trace[i]
        if key is not None and key[1] is None:
            rows.trace[i] = (key[0], req_ids[i])


def options_or_default(extra_args: Any, default_mode: str, default_alpha: float | None,
                       default_weight: float) -> tuple[float, str | None]:
    """(weight, trace id) of a request, inside the engine: never raises.

    Requests are validated at admission (``TaroLogitsProcessor.validate_params``); an option that still reaches the
    engine invalid (a frontend without the validator) must not kill the engine with every in-flight request, so it
    is logged and the request gets the server default.
    """
    try:
        opts = parse_options(extra_args)
        return opts.weight(default_mode, default_alpha), opts.taro_trace
    except Exception as e:  # noqa: BLE001 - any bad input: the engine keeps serving
        logger.error("TARo: invalid per-request options %r reached the engine (%s); using the server default",
                     extra_args, e)
        return default_weight, None
