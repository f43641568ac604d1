"""TARo through vLLM's offline ``LLM`` API.

    from taro_vllm.serving.llm import taro_llm
    llm = taro_llm("path/to/base", router="path/to/router_ckpt", dtype="float32")
    llm.generate(["2 + 2 ="], SamplingParams(max_tokens=8, extra_args={"taro_mode": "fixed", "taro_alpha": 0.5}))

``taro_engine_kwargs`` gives the same settings as keyword arguments for ``LLM(...)``/``EngineArgs(...)``.
"""

from __future__ import annotations

from typing import Any

from taro_vllm.pairing import validate_setup
from taro_vllm.serving.args import merge_hf_overrides, taro_overrides


def taro_engine_kwargs(base: str, router: str, reward_model: str | None = None, *,
                       default_mode: str | None = None, default_alpha: float | None = None,
                       **kwargs: Any) -> dict[str, Any]:
    from taro_vllm.serving.plugin import FEEDER, WORKER_EXTENSION

    setup = validate_setup(base, router, reward_model)
    taro = taro_overrides({"taro_router": setup.router_path, "taro_reward_model": setup.reward_path,
                           "taro_default_mode": default_mode, "taro_default_alpha": default_alpha})
    out = dict(kwargs)
    out["model"] = base
    out["hf_overrides"] = merge_hf_overrides(kwargs.get("hf_overrides"), taro)
    procs = list(kwargs.get("logits_processors") or [])
    out["logits_processors"] = procs + ([FEEDER] if FEEDER not in procs else [])  # both runners (see plugin.py)
    out.setdefault("worker_extension_cls", WORKER_EXTENSION)
    return out


def taro_llm(base: str, router: str, reward_model: str | None = None, **kwargs: Any):
    from vllm import LLM

    return LLM(**taro_engine_kwargs(base, router, reward_model, **kwargs))
