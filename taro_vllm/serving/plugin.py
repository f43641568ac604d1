"""The ``vllm.general_plugins`` entry point: registers TaroForCausalLM and adds the TARo flags to ``vllm serve``;
also the start-up checks of an engine configuration against what TARo can serve.

vLLM loads general plugins in every process (API server, engine core, workers) before it builds its argument
parser, but gives plugins no parser hook. So ``register`` wraps ``EngineArgs.add_cli_args`` (adds the "TARo"
argument group) and ``EngineArgs.from_cli_args`` (folds the flags into the stock ``hf_overrides`` plus the feeder
and worker-extension settings, see :func:`apply_taro_engine_settings`). This touches vLLM internals, hence the
pinned vLLM release; ``TARO_VLLM_NO_CLI_PATCH=1`` turns it off and the flag-free ``--hf-overrides`` form still works.
"""

from __future__ import annotations

import logging
import sys

from taro_vllm import envs
from taro_vllm.serving.args import FEEDER, engine_settings

logger = logging.getLogger("taro_vllm")

_PATCHED = False


def apply_taro_engine_settings(engine_args, taro: dict | None = None) -> None:
    """Fold TARo into EngineArgs (idempotent): ``taro`` (the parsed --taro-* flags) into its hf_overrides, plus the
    per-request options class and the a_t worker extension (:func:`~taro_vllm.serving.args.engine_settings`).

    ``TaroLogitsProcessor`` implements both of vLLM's logits-processor interfaces (the V1 feeder, the V2 admission
    validator), so it is added whichever runner vLLM picks; the model checks vLLM's own decision
    (``VllmConfig.use_v2_model_runner``) at start-up (:func:`check_engine_config`).
    """
    hf = engine_args.hf_overrides
    if not taro and (not isinstance(hf, dict) or "taro_router" not in hf):
        return
    settings = engine_settings(taro or {}, hf, engine_args.logits_processors, engine_args.worker_extension_cls)
    for name, value in settings.items():
        setattr(engine_args, name, value)


def _has_feeder(logits_processors) -> bool:
    from taro_vllm.serving.rows import TaroLogitsProcessor

    for p in logits_processors or ():
        if p == FEEDER or (isinstance(p, type) and issubclass(p, TaroLogitsProcessor)):
            return True
    return False


def unsupported_setup(*, base_cfg: dict, reward_cfg: dict, reward_path: str, max_model_len: int | None,
                      speculative: bool, prompt_embeds: bool) -> list[str]:
    """Why a TARo setup cannot be served correctly (empty: it can). Pure: used by ``taro-vllm serve`` on its argv
    before vLLM starts, and by the model on the real VllmConfig."""
    reasons = []
    if speculative:
        reasons.append("speculative decoding (--speculative-config) is not supported with TARo: draft rows would "
                       "silently drop the per-request modes and traces; serve without it")
    if prompt_embeds:
        reasons.append("--enable-prompt-embeds is not supported with TARo: the reward model needs token ids")
    reward_ctx = reward_cfg.get("max_position_embeddings")
    if max_model_len is not None and isinstance(reward_ctx, int) and reward_ctx < max_model_len:
        reasons.append(f"the reward model {reward_path} has max_position_embeddings {reward_ctx}, shorter than the "
                       f"served max model length {max_model_len}; pass --max-model-len {reward_ctx} or less "
                       "(beyond its context the reward model's positions are out of range)")
    qb, qr = base_cfg.get("quantization_config"), reward_cfg.get("quantization_config")
    if qb != qr:
        def name(q):
            return "not quantized" if not q else f"quantized ({q.get('quant_method', 'unknown method')})"
        reasons.append(f"the base model is {name(qb)} but the reward model {reward_path} is {name(qr)}: vLLM builds "
                       "both with the base model's quantization config; serve checkpoints quantized the same way "
                       "(or both unquantized, optionally with --quantization for both)")
    return reasons


def check_engine_config(vllm_config, reward_hf, reward_path: str) -> None:
    """Refuse, at model construction, an engine configuration TARo cannot serve correctly (ValueError)."""
    model_config = vllm_config.model_config
    base_cfg = model_config.hf_config.to_dict()
    reasons = unsupported_setup(
        base_cfg=base_cfg, reward_cfg=reward_hf.to_dict(), reward_path=reward_path,
        max_model_len=model_config.max_model_len, speculative=vllm_config.speculative_config is not None,
        prompt_embeds=bool(model_config.enable_prompt_embeds))
    if not _has_feeder(model_config.logits_processors):
        runner = "V2" if vllm_config.use_v2_model_runner else "V1"  # vLLM's own decision
        role = ("validates the taro_* request options at admission (HTTP 400)" if runner == "V2"
                else "feeds the per-request taro_* options to the model")
        reasons.append(f"TARo needs --logits-processors {FEEDER} (taro-vllm serve, vllm serve --taro-router and "
                       f"taro_llm add it): on vLLM's {runner} model runner it {role}")
    if reasons:
        raise ValueError("TARo cannot serve this configuration: " + "; ".join(reasons))


def _patch_cli() -> None:
    global _PATCHED
    if _PATCHED or envs.cli_patch_disabled():
        return
    from vllm.engine.arg_utils import EngineArgs

    from taro_vllm.serving.args import add_taro_args, taro_overrides

    original_add = EngineArgs.add_cli_args
    original_from = EngineArgs.from_cli_args.__func__

    def add_cli_args(parser):
        parser = original_add(parser)
        if not any(a.dest == "taro_router" for a in parser._actions):
            add_taro_args(parser)
        return parser

    def from_cli_args(cls, args):
        engine_args = original_from(cls, args)
        apply_taro_engine_settings(engine_args, taro_overrides(vars(args)))
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
    try:
        keep_boolean_xargs()
    except Exception as e:  # a vLLM whose request models moved: booleans are coerced to 0/1 as before
        logger.warning("taro_vllm: could not keep booleans in vllm_xargs (%s)", e)


_XARGS_MODELS = {"vllm.entrypoints.openai.completion.protocol": "CompletionRequest",
                 "vllm.entrypoints.openai.chat_completion.protocol": "ChatCompletionRequest",
                 "vllm.entrypoints.openai.responses.protocol": "ResponsesRequest",
                 "vllm.entrypoints.anthropic.protocol": "AnthropicMessagesRequest"}


def _keep_booleans_in(module) -> None:
    scalar = bool | str | int | float
    annotation = dict[str, scalar | list[scalar]] | None
    cls = getattr(module, _XARGS_MODELS[module.__name__], None)
    field = cls.model_fields.get("vllm_xargs") if cls is not None else None
    if field is None or field.annotation == annotation:
        return
    field.annotation = annotation
    cls.model_rebuild(force=True)


class _PatchOnImport:
    """A meta-path finder that patches the request models as their modules are imported, so processes that never
    serve HTTP (engine core, workers) never import them."""

    def find_spec(self, name, path=None, target=None):
        if name not in _XARGS_MODELS:
            return None
        import importlib.util

        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(name)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            try:
                _keep_booleans_in(module)
            except Exception as e:  # a vLLM whose request models moved: booleans are coerced to 0/1 as before
                logger.warning("taro_vllm: could not keep booleans in vllm_xargs (%s)", e)

        loader.exec_module = exec_module
        return spec


def keep_boolean_xargs() -> None:
    """Keep JSON booleans in ``vllm_xargs`` as booleans, so ``"taro_alpha": true`` is a 400, not a = 1.0.

    vLLM types ``vllm_xargs`` as ``dict[str, str | int | float | list[...]]``, and pydantic's lax mode turns
    ``true`` into ``1`` before any plugin sees it. Putting ``bool`` first in the union keeps it (``1``, ``1.5`` and
    ``"x"`` still parse as before). It must happen before vLLM builds its API routes (they copy the schema): request
    models already imported are patched now, the others as they are imported.
    """
    for name in _XARGS_MODELS:
        if name in sys.modules:
            _keep_booleans_in(sys.modules[name])
    if not any(isinstance(f, _PatchOnImport) for f in sys.meta_path):
        sys.meta_path.insert(0, _PatchOnImport())
