"""The TARo command-line flags, and how they fold into vLLM's stock ``--hf-overrides``.

Pure argparse (no vllm import) so tools that check manifests or build commands can use it. The same flags are
added to ``vllm serve`` by the plugin and accepted by ``taro-vllm serve``; both end up as hf_overrides keys, which
reach every vLLM process (API server, engine core, workers) as attributes of the served model's HF config:

    --taro-router CKPT          -> {"architectures": ["TaroForCausalLM"], "taro_router": CKPT}
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
        metavar="CKPT", default=None,
        help="TARo router checkpoint folder (config.json + model.safetensors). Enables TARo: the reward model it "
             "names is loaded into the same engine and every token is sampled from the router-mix.")),
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
    if out and "taro_router" not in out:
        raise ValueError("--taro-reward-model/--taro-default-* need --taro-router CKPT")
    if out:
        out["architectures"] = [ARCH]
    return out


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
