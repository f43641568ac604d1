"""Per-request TARo options: the ``taro_*`` keys of ``vllm_xargs`` / ``SamplingParams.extra_args``, and the server
defaults a request without them gets. Pure (no vllm import): parsing, validation and the mode -> weight mapping.

    {"taro_mode": "router"}                      the learned router (default)
    {"taro_router": "math"}                      one of the engine's routers by name (routers.py); implies router
    {"taro_mode": "fixed", "taro_alpha": 0.3}    one weight for every token (GenARM); taro_alpha alone implies fixed
    {"taro_mode": "base"}  /  {"taro_mode": "reward"}   one model alone (a = 0 / a = 1)
    {"taro_trace": "my-id"}                      record a_t per token; fetch with GET /v1/taro/alphas/my-id
    {"taro_alphas": true}                        a_t of each token in the response itself (server flag
                                                 --taro-return-alphas; the HTTP layer, responses.py, sets taro_trace)
    {"taro_alphas": true, "taro_logprobs": true}  also the base's and the reward's log-prob of each sampled token
                                                 (sampled.py records them after the sampler)

How a request's weight reaches its batch row: ``rows.py``.
"""

from __future__ import annotations

import logging
import math
from typing import Any, Literal, NamedTuple

from pydantic import BaseModel, ConfigDict, ValidationError, field_validator, model_validator

from taro_vllm.serving.args import MODES

logger = logging.getLogger("taro_vllm")

XARG_KEYS = ("taro_mode", "taro_alpha", "taro_trace", "taro_alphas", "taro_logprobs", "taro_router")


class TaroRequestOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    taro_mode: Literal["router", "fixed", "base", "reward"] | None = None
    taro_alpha: float | None = None
    taro_trace: str | None = None
    taro_alphas: bool | None = None
    taro_logprobs: bool | None = None
    taro_router: str | None = None

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

    @field_validator("taro_router", mode="before")
    @classmethod
    def _router_is_a_name(cls, v: Any) -> Any:
        from taro_vllm.serving.routers import NAME

        if v is not None and (not isinstance(v, str) or not NAME.match(v)):
            raise ValueError(f"taro_router must be a router name (letters, digits, '.', '_', '-'), got {v!r}")
        return v

    @field_validator("taro_alphas", "taro_logprobs", mode="before")
    @classmethod
    def _flag_is_a_boolean(cls, v: Any, info) -> Any:
        if v is not None and not isinstance(v, bool):
            raise ValueError(f"{info.field_name} must be true or false, got {v!r}")
        return v

    @model_validator(mode="after")
    def _mode_and_alpha_agree(self) -> "TaroRequestOptions":
        if self.taro_alphas and self.taro_trace is None:
            # The HTTP layer (the taro_alphas endpoint plugin) turns taro_alphas into a trace it reads back; without
            # it the request would come back without its a_t, silently.
            raise ValueError("taro_alphas needs taro-vllm's HTTP layer (the taro_alphas endpoint plugin, which "
                             "taro-vllm serve loads) and a server started with --taro-return-alphas")
        if self.taro_logprobs and not self.taro_alphas:
            raise ValueError("taro_logprobs adds the base's and the reward's log-prob of each sampled token to the "
                             'a_t in the response: set "taro_alphas": true too')
        if self.taro_mode == "fixed" and self.taro_alpha is None:
            raise ValueError('taro_mode "fixed" needs taro_alpha in [0, 1]')
        if self.taro_mode in ("router", "base", "reward") and self.taro_alpha is not None:
            raise ValueError(f'taro_alpha is only valid with taro_mode "fixed", not "{self.taro_mode}"')
        if self.taro_router is not None and (self.taro_mode not in (None, "router") or self.taro_alpha is not None):
            raise ValueError('taro_router picks a router: it is only valid with taro_mode "router"')
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


class TaroDefaults(BaseModel):
    """What a request that sets no ``taro_*`` option gets (``--taro-default-mode`` / ``--taro-default-alpha``), read
    from the served model's HF config in this one place; bad defaults are refused (ValueError) at start-up."""

    model_config = ConfigDict(frozen=True)

    mode: Literal["router", "fixed", "base", "reward"] = "router"
    alpha: float | None = None

    @classmethod
    def from_hf_config(cls, hf_config: Any) -> "TaroDefaults":
        mode = getattr(hf_config, "taro_default_mode", None) or "router"
        alpha = getattr(hf_config, "taro_default_alpha", None)
        parse_options({"taro_mode": mode, **({"taro_alpha": alpha} if alpha is not None else {})})
        return cls(mode=mode, alpha=alpha)

    @property
    def weight(self) -> float:
        """The row weight of a request without options (NaN = the router)."""
        return TaroRequestOptions().weight(self.mode, self.alpha)


class RowOptions(NamedTuple):
    """What the engine needs of one request's options (:func:`options_or_default`)."""

    weight: float  # the row override: [0, 1], NaN = a router
    trace: str | None  # taro_trace: record a_t under this id
    router: str | None  # the router by name; None = the default router
    logprobs: bool = False  # taro_logprobs: also record the base's and reward's log-prob of each sampled token


def options_or_default(extra_args: Any, defaults: TaroDefaults) -> RowOptions:
    """(weight, trace id, router name or None for the default router, logprobs asked) of a request, inside the
    engine: never raises.

    Requests are validated at admission (``TaroLogitsProcessor.validate_params``); an option that still reaches the
    engine invalid (a frontend without the validator) must not kill the engine with every in-flight request, so it
    is logged and the request gets the server default.
    """
    try:
        opts = parse_options(extra_args)
        mode_weight = opts.weight("router" if opts.taro_router else defaults.mode, defaults.alpha)
        return RowOptions(mode_weight, opts.taro_trace, opts.taro_router,
                          bool(opts.taro_logprobs) and opts.taro_trace is not None)
    except Exception as e:  # noqa: BLE001 - any bad input: the engine keeps serving
        logger.error("TARo: invalid per-request options %r reached the engine (%s); using the server default",
                     extra_args, e)
        return RowOptions(defaults.weight, None, None)
