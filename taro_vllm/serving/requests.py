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
``VLLM_USE_V2_MODEL_RUNNER=0``) and ``TaroModelState`` (model.py) on the V2 GPU runner.
"""

from __future__ import annotations

import math
import threading
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from taro_vllm.serving.args import MODES

XARG_KEYS = ("taro_mode", "taro_alpha", "taro_trace")


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


class RowState:
    """Per-row TARo settings of the running batch, shared by the feeder and the model in one worker process.

    ``begin_step`` is called by the feeder once per scheduler step, before the forward pass; the model consumes it in
    the first ``compute_logits`` call whose row count matches (later calls in the same step, e.g. prompt logprobs,
    use the router and the server default only).
    """

    def __init__(self, max_rows: int, default_weight: float = math.nan):
        self.default_weight = default_weight
        self.override = torch.full((max_rows,), default_weight, dtype=torch.float32)
        self.trace: list[str | None] = [None] * max_rows
        self.num_rows = 0
        self.fresh = False
        self.lock = threading.Lock()

    def ensure(self, rows: int) -> None:
        if rows > self.override.numel():
            extra = rows - self.override.numel()
            self.override = torch.cat([self.override, torch.full((extra,), self.default_weight)])
            self.trace.extend([None] * extra)

    def set_row(self, i: int, weight: float, trace: str | None) -> None:
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
        self.num_rows = num_rows
        self.fresh = True

    def take(self, rows: int) -> tuple[torch.Tensor | None, list[str | None] | None]:
        """Overrides (None when nothing is overridden) and trace ids for this step's sampling rows.

        Trace ids are None for calls that are not a step's sampling call (warm-up, profiling, prompt logprobs):
        their a_t are not recorded.
        """
        if not self.fresh or rows != self.num_rows:
            return self._default(rows), None
        self.fresh = False
        ovr = self.override[:rows]
        trace = self.trace[:rows]
        if bool(torch.isnan(ovr).all()):
            return None, trace
        return ovr.clone(), trace

    def _default(self, rows: int) -> torch.Tensor | None:
        if math.isnan(self.default_weight):
            return None
        return torch.full((rows,), self.default_weight)


# One engine per worker process; the model registers its RowState here and the feeder finds it.
_ROWS: dict[str, RowState] = {}


def register_rows(key: str, rows: RowState) -> None:
    _ROWS[key] = rows


def rows_for(key: str) -> RowState | None:
    return _ROWS.get(key)


def engine_key(vllm_config: Any) -> str:
    """Key shared by the model and the feeder of one engine (both get the same VllmConfig)."""
    return str(getattr(vllm_config.model_config, "model", ""))


def _v1_processor_base() -> type:
    from vllm.v1.sample.logits_processor import LogitsProcessor

    return LogitsProcessor


class TaroLogitsProcessor(_v1_processor_base()):  # type: ignore[misc]
    """V1-runner feeder: keeps the per-row overrides in step with the persistent batch. ``apply`` is a no-op.

    Passed with ``--logits-processors taro_vllm.serving.requests:TaroLogitsProcessor`` (``taro-vllm serve`` and
    ``taro_vllm.serving.llm`` add it when the V1 runner runs). It is deliberately NOT registered as a
    ``vllm.logits_processors`` entry point: vLLM 0.32's V2 GPU runner refuses to start when one is installed.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_options(sampling_params.extra_args)

    def __init__(self, vllm_config, device, is_pin_memory) -> None:
        hf = vllm_config.model_config.hf_config
        self.default_mode = getattr(hf, "taro_default_mode", None) or "router"
        self.default_alpha = getattr(hf, "taro_default_alpha", None)
        self.key = engine_key(vllm_config)
        self.rows: RowState | None = None

    def _rows(self) -> RowState | None:
        if self.rows is None:
            self.rows = rows_for(self.key)
        return self.rows

    def is_argmax_invariant(self) -> bool:
        return True  # apply() changes nothing; the mix happened in compute_logits

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        return logits

    def update_state(self, batch_update) -> None:
        rows = self._rows()
        if rows is None:  # not a TARo engine: nothing to feed
            return
        with rows.lock:
            if batch_update is not None:
                for i in batch_update.removed:
                    rows.clear_row(i)
                for i, params, _prompt, _out in batch_update.added:
                    opts = parse_options(params.extra_args)
                    rows.set_row(i, opts.weight(self.default_mode, self.default_alpha), opts.taro_trace)
                from vllm.v1.sample.logits_processor import MoveDirectionality

                for src, dst, direction in batch_update.moved:
                    rows.move(src, dst, direction == MoveDirectionality.SWAP)
                rows.begin_step(batch_update.batch_size)
            else:
                rows.begin_step(rows.num_rows)
