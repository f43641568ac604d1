"""TaroForCausalLM: the base and the reward model in one vLLM model, mixed by the router inside compute_logits.

    forward         both sub-models run on the same tokens (each with its own paged KV cache layers, in vLLM's one
                    KV-cache group); returns [h_base | h_reward]
    compute_logits  both heads -> router features -> a_t -> per-row overrides -> (1 - a) z_base + a z_reward
                    (taro_vllm.mix.fused_mix). Everything after it - logprobs, penalties, sampling - sees the mix.
    load_weights    the served (base) checkpoint comes unprefixed, the reward model's as ``reward.*`` via
                    ``secondary_weights``; the router is loaded and validated by taro_vllm.checkpoint.

Sub-models are vLLM's own classes for their architectures (resolved by vLLM's registry), built from their own HF
configs, so any decoder vLLM supports works and tensor parallelism shards both inside the one TP group. Each gets
a distinct ``taro_role`` in its config (and the reward a distinct compile tag), so their torch.compile artefacts
never collide even when both models share one architecture and size.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from collections.abc import Iterable
from pathlib import Path

import torch
from torch import nn

from taro_vllm import mix
from taro_vllm.checkpoint import load_router, read_config
from taro_vllm.pairing import validate_setup
from taro_vllm.router import build_router
from taro_vllm.serving import alphas as alpha_recording
from taro_vllm.serving.requests import RowState, engine_key, parse_options, register_rows

logger = logging.getLogger("taro_vllm")


def _original_architectures(base_path: str) -> list[str]:
    cfg = Path(base_path) / "config.json"
    archs = json.loads(cfg.read_text()).get("architectures") if cfg.is_file() else None
    if not archs or archs == ["TaroForCausalLM"]:
        raise ValueError(f"{cfg}: cannot tell the base model's architecture; serve a Hugging Face model folder")
    return archs


class TaroForCausalLM(nn.Module):
    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__()
        from vllm.compilation.backends import set_model_tag
        from vllm.model_executor.model_loader.default_loader import DefaultModelLoader
        from vllm.model_executor.models.utils import init_vllm_registered_model, maybe_prefix
        from vllm.transformers_utils.config import get_config

        model_config = vllm_config.model_config
        hf = model_config.hf_config
        router_path = getattr(hf, "taro_router", None)
        if not router_path:
            raise ValueError("TaroForCausalLM needs a router checkpoint: --taro-router CKPT "
                             "(or --hf-overrides '{\"taro_router\": CKPT}')")
        self.setup = validate_setup(model_config.model, router_path, getattr(hf, "taro_reward_model", None))

        base_hf = copy.deepcopy(hf)
        base_hf.architectures = _original_architectures(model_config.model)
        base_hf.taro_role = "base"
        reward_hf = get_config(self.setup.reward_path, trust_remote_code=model_config.trust_remote_code)
        reward_hf.taro_role = "reward"
        self.base = init_vllm_registered_model(vllm_config, hf_config=base_hf, prefix=maybe_prefix(prefix, "base"))
        with set_model_tag("taro_reward"):
            self.reward = init_vllm_registered_model(
                vllm_config, hf_config=reward_hf, prefix=maybe_prefix(prefix, "reward")
            )
        self.hidden_sizes = [base_hf.hidden_size, reward_hf.hidden_size]
        self.secondary_weights = [
            DefaultModelLoader.Source(self.setup.reward_path, None, prefix="reward.", fall_back_to_pt=False)
        ]
        # The router is tiny: keep it in fp32 whatever the served dtype, as it was trained.
        self.router = build_router(read_config(router_path).router).float()
        self.make_empty_intermediate_tensors = getattr(self.base, "make_empty_intermediate_tensors", None)

        default_mode = getattr(hf, "taro_default_mode", None) or "router"
        default_alpha = getattr(hf, "taro_default_alpha", None)
        parse_options({"taro_mode": default_mode, **({"taro_alpha": default_alpha} if default_alpha is not None
                                                      else {})})  # refuse bad server defaults at start-up
        default_weight = {"router": math.nan, "base": 0.0, "reward": 1.0}.get(default_mode, default_alpha)
        self.rows = RowState(vllm_config.scheduler_config.max_num_seqs, default_weight)
        self.eos_token_id = getattr(hf, "eos_token_id", None)
        register_rows(engine_key(vllm_config), self.rows)

    # --- vLLM model interface -------------------------------------------------------------------------------

    def embed_input_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.base.embed_input_ids(input_ids)

    def forward(self, input_ids, positions, intermediate_tensors=None, inputs_embeds=None, **kwargs):
        if inputs_embeds is not None:
            raise ValueError("TARo does not support prompt embeddings: the reward model needs token ids")
        h_base = self.base(input_ids, positions, intermediate_tensors, None)
        h_reward = self.reward(input_ids, positions, None, None)
        return torch.cat([h_base, h_reward], dim=-1)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        h_base, h_reward = hidden_states.split(self.hidden_sizes, dim=-1)
        z_base = self.base.compute_logits(h_base)
        z_reward = self.reward.compute_logits(h_reward)
        if z_base is None:  # not the last pipeline rank
            return None
        with self.rows.lock:
            override, trace = self.rows.take(z_base.shape[0])
        if override is not None:
            override = override.to(z_base.device)
        res = mix.fused_mix(z_base, z_reward, router=self.router, override=override)
        logits = res.logits
        if bool(res.nonfinite.any()):
            logits = self._repair_nonfinite(z_base, mix.align_vocab(z_reward, z_base), res)
        if trace is not None:
            alpha_recording.RECORDER.record(res.alpha, trace)
        return logits

    def _repair_nonfinite(self, z_base, z_reward, res: mix.MixResult) -> torch.Tensor:
        """Rows where a model produced NaN/+inf: use the other model alone; if both are broken, end the sequence.

        Never sample from garbage. Logged, and counted in the taro_nonfinite_rows metric.
        """
        logits = res.logits
        bad = res.nonfinite.nonzero().flatten()
        def usable(z: torch.Tensor) -> bool:  # -inf entries are masks, not damage
            return not bool(torch.isnan(z).any() or torch.isposinf(z).any())

        for row in bad.tolist():  # rare path: a loop over the broken rows only
            base_ok, reward_ok = usable(z_base[row]), usable(z_reward[row])
            if base_ok:
                logits[row] = z_base[row].float()
                res.alpha[row] = 0.0
            elif reward_ok:
                logits[row] = z_reward[row].float()
                res.alpha[row] = 1.0
            else:
                logits[row] = float("-inf")
                if self.eos_token_id is not None:
                    logits[row, self.eos_token_id] = 0.0
                res.alpha[row] = float("nan")
        with alpha_recording.RECORDER.lock:
            alpha_recording.RECORDER.nonfinite_rows += int(bad.numel())
        logger.error("TARo: non-finite logits in %d row(s); used the finite model alone (or ended the sequence)",
                     int(bad.numel()))
        return logits

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from vllm.model_executor.models.utils import AutoWeightsLoader

        def route():
            for name, tensor in weights:
                yield (name if name.startswith("reward.") else f"base.{name}"), tensor

        loaded = AutoWeightsLoader(self).load_weights(route())
        router, _ = load_router(self.setup.router_path, expected_vocab_size=self.setup.vocab_size,
                                expected_tokenizer_fingerprint=self.setup.tokenizer_fingerprint)
        state = router.state_dict()
        with torch.no_grad():
            for name, p in self.router.named_parameters():
                p.copy_(state[name].to(p.dtype))
        loaded |= {f"router.{n}" for n, _ in self.router.named_parameters()}
        return loaded

    def get_model_state_cls(self):
        """vLLM's V2 GPU model runner asks the model for its per-request state (see model_state.py)."""
        from taro_vllm.serving.model_state import TaroModelState

        return TaroModelState
