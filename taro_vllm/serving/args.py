"""The TARo command-line flags, and how they fold into vLLM's stock ``--hf-overrides``.

Pure argparse (no vllm import) so tools that check manifests or build commands can use it. The same flags are
added to ``vllm serve`` by the plugin and accepted by ``taro-vllm serve``; both end up as hf_overrides keys, which
reach every vLLM process (API server, engine core, workers) as attributes of the served model's HF config:

    --taro-router CKPT          -> {"architectures": ["TaroForCausalLM"], "taro_router": CKPT}
    --taro-router NAME=CKPT ... -> also {"taro_routers": {NAME: CKPT, ...}}   (repeatable; the first is the default)
    --taro-model-alias N=MODE   -> {"taro_model_aliases": {N: MODE}}  (repeatable; MODE: base, reward, router[:NAME],
                                   fixed:A; "model": N picks that mode, for clients that cannot send vllm_xargs)
    --taro-reward-model PATH    -> {"taro_reward_model": PATH}
    --taro-default-mode MODE    -> {"taro_default_mode": MODE}
    --taro-default-alpha A      -> {"taro_default_alpha": A}
    --taro-no-weight-check      -> {"taro_no_weight_check": true}   (or TARO_VLLM_NO_WEIGHT_CHECK=1 in the environment)
    --taro-return-alphas        -> {"taro_return_alphas": true}     (requests may ask for a_t in the response)
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from taro_vllm import envs

ARCH = "TaroForCausalLM"
MODES = ("router", "fixed", "base", "reward")
# Both runners: the V1 feeder and the V2 admission validator are one class (rows.py).
FEEDER = "taro_vllm.serving.rows:TaroLogitsProcessor"
WORKER_EXTENSION = "taro_vllm.serving.alphas.TaroWorkerExtension"  # dotted: vLLM's resolve_obj_by_qualname
NO_WEIGHT_CHECK_ENV = envs.TARO_VLLM_NO_WEIGHT_CHECK

# flag -> (hf_overrides key, argparse kwargs)
TARO_FLAGS: dict[str, tuple[str, dict[str, Any]]] = {
    "--taro-router": ("taro_router", dict(
        metavar="[NAME=]CKPT", default=None, action="append",
        help="TARo router checkpoint folder (config.json + model.safetensors). Enables TARo: the reward model it "
             "names is loaded into the same engine and every token is sampled from the router-mix. Repeat as "
             "NAME=CKPT for several routers in one engine (the first is the default); a request picks one with "
             "vllm_xargs.taro_router or by using NAME as its model")),
    "--taro-reward-model": ("taro_reward_model", dict(
        metavar="PATH", default=None,
        help="reward model folder; overrides the one named in the router checkpoint")),
    "--taro-default-mode": ("taro_default_mode", dict(
        choices=MODES, default=None,
        help="mode for requests that do not set vllm_xargs.taro_mode (default: router)")),
    "--taro-default-alpha": ("taro_default_alpha", dict(
        type=float, metavar="A", default=None,
        help="weight in [0,1] for --taro-default-mode fixed (GenARM)")),
    "--taro-no-weight-check": ("taro_no_weight_check", dict(
        action="store_const", const=True, default=None,
        help=f"skip the NaN/inf check of the base and reward weights while they load (one reduction per tensor; "
             f"{NO_WEIGHT_CHECK_ENV}=1 does the same)")),
    "--taro-model-alias": ("taro_model_aliases", dict(
        metavar="NAME=MODE", default=None, action="append",
        help="serve a TARo mode under a model name of its own, e.g. taro-base=base, taro-fixed-0.3=fixed:0.3, "
             "taro-math=router:math (repeatable; for clients that cannot send vllm_xargs)")),
    "--taro-return-alphas": ("taro_return_alphas", dict(
        action="store_const", const=True, default=None,
        help='allow requests to ask for each token\'s a_t in the response (vllm_xargs {"taro_alphas": true}): '
             'per choice, in streaming chunks too, with a per-request summary in "metrics"')),
}


def add_taro_args(parser: argparse.ArgumentParser) -> argparse._ArgumentGroup:
    group = parser.add_argument_group("TARo", "Token-level adaptive routing between the served (base) model and a "
                                      "reward model (taro_vllm)")
    for flag, (_, kwargs) in TARO_FLAGS.items():
        group.add_argument(flag, **kwargs)
    return group


def taro_overrides(values: dict[str, Any]) -> dict[str, Any]:
    """hf_overrides entries for parsed TARo values (``{"taro_router": ...}`` keyed by dest or hf key)."""
    out: dict[str, Any] = {}
    for flag, (key, _) in TARO_FLAGS.items():
        dest = flag.lstrip("-").replace("-", "_")
        v = values.get(dest, values.get(key))
        if v is not None:
            out[key] = v
    if "taro_router" in out:
        from taro_vllm.serving.routers import parse_router_specs, router_name

        routers = dict(values.get("taro_routers") or parse_router_specs(out["taro_router"]))
        out["taro_router"] = next(iter(routers.values()))  # the default router: what one-router code reads
        if len(routers) > 1 or next(iter(routers)) != router_name(out["taro_router"]):
            out["taro_routers"] = routers
    if "taro_model_aliases" in out:
        out["taro_model_aliases"] = parse_model_aliases(out["taro_model_aliases"])
    if out and "taro_router" not in out:
        raise ValueError("--taro-reward-model/--taro-default-* need --taro-router CKPT")
    if out:
        out["architectures"] = [ARCH]
    return out


def parse_model_aliases(values: list[str] | dict[str, str]) -> dict[str, str]:
    """``NAME=MODE`` values -> ``{name: mode}``; MODE is base, reward, router, router:NAME or fixed:A."""
    if isinstance(values, dict):
        items = list(values.items())
    else:
        items = []
        for v in values:
            name, sep, mode = v.partition("=")
            if not sep or not name:
                raise ValueError(f"--taro-model-alias {v!r}: expected NAME=MODE, e.g. taro-base=base")
            items.append((name, mode))
    out = {}
    for name, mode in items:
        alias_xargs(mode)  # refuses a bad mode now, at start-up
        out[name] = mode
    return out


def alias_xargs(mode: str) -> dict[str, Any]:
    """The vllm_xargs a model alias stands for."""
    if mode in ("base", "reward", "router"):
        return {"taro_mode": mode}
    if mode.startswith("router:") and mode[7:]:
        return {"taro_mode": "router", "taro_router": mode[7:]}
    if mode.startswith("fixed:"):
        try:
            a = float(mode[6:])
        except ValueError:
            a = -1.0
        if 0.0 <= a <= 1.0:
            return {"taro_mode": "fixed", "taro_alpha": a}
    raise ValueError(f"model alias mode {mode!r}: use base, reward, router, router:NAME or fixed:A (A in [0, 1])")


def merge_hf_overrides(existing: Any, taro: dict[str, Any]) -> dict[str, Any]:
    """Merge TARo keys into a user's --hf-overrides (dict or JSON string); the TARo flags win."""
    if existing is None or existing == "":
        base: dict[str, Any] = {}
    elif isinstance(existing, str):
        base = json.loads(existing)
    else:
        base = dict(existing)
    base.update(taro)
    return base


def engine_settings(taro: dict[str, Any], hf_overrides: Any = None, logits_processors: Any = None,
                    worker_extension_cls: str | None = None) -> dict[str, Any]:
    """TARo switched on in an engine, written once: the ``EngineArgs`` fields (``taro``: :func:`taro_overrides`
    output, folded into the user's ``hf_overrides``; the feeder added to the user's logits processors; the a_t worker
    extension unless the user set one). Applied to EngineArgs by the plugin's ``from_cli_args``, to ``LLM(...)``
    kwargs by ``taro_llm``, and as argv by ``taro-vllm serve``."""
    procs = list(logits_processors or [])
    return {"hf_overrides": merge_hf_overrides(hf_overrides, taro),
            "logits_processors": procs + ([FEEDER] if FEEDER not in procs else []),
            "worker_extension_cls": worker_extension_cls or WORKER_EXTENSION}


def weight_check_enabled(hf_config: Any) -> bool:
    """Whether TaroForCausalLM checks the weights it loads for NaN/inf (on unless the flag or the env var says no)."""
    if getattr(hf_config, "taro_no_weight_check", False):
        return False
    return not envs.weight_check_disabled()
