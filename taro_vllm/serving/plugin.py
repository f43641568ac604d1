"""The ``vllm.general_plugins`` entry point: registers TaroForCausalLM and adds the TARo flags to ``vllm serve``.

vLLM loads general plugins in every process (API server, engine core, workers) before it builds its argument
parser, but gives plugins no parser hook. So ``register`` wraps ``EngineArgs.add_cli_args`` (adds the "TARo"
argument group) and ``EngineArgs.from_cli_args`` (folds the flags into the stock ``hf_overrides`` plus the feeder
and worker-extension settings, see :func:`apply_taro_engine_settings`). This touches vLLM internals, hence the
pinned vLLM release; ``TARO_VLLM_NO_CLI_PATCH=1`` turns it off and the flag-free ``--hf-overrides`` form still works.
"""

from __future__ import annotations

import logging
import os

logger = logging.getLogger("taro_vllm")

FEEDER = "taro_vllm.serving.requests:TaroLogitsProcessor"
WORKER_EXTENSION = "taro_vllm.serving.alphas.TaroWorkerExtension"  # dotted: resolve_obj_by_qualname
_PATCHED = False


def uses_v1_runner() -> bool:
    """True when vLLM will run its V1 model runner (CPU always; GPU only with VLLM_USE_V2_MODEL_RUNNER=0)."""
    env = os.environ.get("VLLM_USE_V2_MODEL_RUNNER")
    if env is not None:
        return env.strip().lower() in ("0", "false")
    from vllm.platforms import current_platform

    return current_platform.is_cpu() or not _has_triton()


def _has_triton() -> bool:
    try:
        from vllm.triton_utils import HAS_TRITON

        return bool(HAS_TRITON)
    except Exception:
        return False


def apply_taro_engine_settings(engine_args) -> None:
    """Fold TARo into EngineArgs (idempotent): the V1 feeder and the a_t worker extension."""
    hf = engine_args.hf_overrides
    if not isinstance(hf, dict) or "taro_router" not in hf:
        return
    if uses_v1_runner():
        procs = list(engine_args.logits_processors or [])
        if FEEDER not in procs:
            engine_args.logits_processors = procs + [FEEDER]
    default_ext = ""
    if engine_args.worker_extension_cls in (None, default_ext):
        engine_args.worker_extension_cls = WORKER_EXTENSION


def _patch_cli() -> None:
    global _PATCHED
    if _PATCHED or os.environ.get("TARO_VLLM_NO_CLI_PATCH") == "1":
        return
    from vllm.engine.arg_utils import EngineArgs

    from taro_vllm.serving.args import add_taro_args, merge_hf_overrides, taro_overrides

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser):
        parser = original_add(parser)
        if not any(a.dest == "taro_router" for a in parser._actions):
            add_taro_args(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        taro = taro_overrides(vars(args))
        if taro:
            engine_args.hf_overrides = merge_hf_overrides(engine_args.hf_overrides, taro)
        apply_taro_engine_settings(engine_args)
        return engine_args

    EngineArgs.add_cli_args = staticmethod(add_cli_args)
    EngineArgs.from_cli_args = classmethod(from_cli_args)
    _PATCHED = True


def register() -> None:
    from vllm import ModelRegistry

    if "TaroForCausalLM" not in ModelRegistry.get_supported_archs():
        ModelRegistry.register_model("TaroForCausalLM", "taro_vllm.serving.model:TaroForCausalLM")
    try:
        _patch_cli()
    except Exception as e:  # a vLLM whose internals moved: the --hf-overrides form still works
        logger.warning("taro_vllm: could not add --taro-* flags to vllm's CLI (%s); use taro-vllm serve", e)
