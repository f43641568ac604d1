"""TaroForCausalLM: the base and the reward model in one vLLM model, mixed by the router inside compute_logits.

    forward         both sub-models run on the same tokens (each with its own paged KV cache layers, in vLLM's one
                    KV-cache group); returns [h_base | h_reward]
    compute_logits  both heads -> router features -> a_t -> per-row overrides -> (1 - a) z_base + a z_reward
                    (taro_vllm.mix.route_and_mix). Everything after it - logprobs, penalties, sampling - sees the mix.
                    Traced rows leave their a_t (and, with taro_logprobs, both models' own log-softmax) for the
                    sampler hook (sampled.py), which records them at the token sampled, if one was.
    load_weights    the served (base) checkpoint comes unprefixed, the reward model's as ``reward.*`` via
                    ``secondary_weights``, both checked for NaN/inf as they load (model_files.FiniteWeights); the
                    router is loaded and validated by taro_vllm.checkpoint.

Sub-models are vLLM's own classes for their architectures (resolved by vLLM's registry), built from their own HF
configs, so any decoder vLLM supports works and tensor parallelism shards both inside the one TP group. Each gets
a distinct ``taro_role`` in its config (and the reward a distinct compile tag), so their torch.compile artefacts
never collide even when both models share one architecture and size.
"""

from __future__ import annotations

import copy
import logging
import sys
from collections.abc import Iterable

import numpy as np
import torch
from torch import nn

from taro_vllm import mix
from taro_vllm.model_files import FiniteWeights, tensor_sources
from taro_vllm.pairing import validate_extra_router, validate_setup
from taro_vllm.router import build_router
from taro_vllm.serving import alphas as alpha_recording
from taro_vllm.serving.args import NO_WEIGHT_CHECK_ENV, weight_check_enabled
from taro_vllm.serving.options import TaroDefaults
from taro_vllm.serving.routers import GroupedRouters, RouterSet, served_routers
from taro_vllm.serving.rows import RowState, register_rows
from taro_vllm.serving.sampled import SampledLogprobs

logger = logging.getLogger("taro_vllm")


def _original_architectures(setup) -> list[str]:
    archs = setup.base_config.get("architectures")
    if not archs or archs == ["TaroForCausalLM"]:
        raise ValueError(f"{setup.base_path}/config.json: cannot tell the base model's architecture; serve a Hugging "
                         "Face model folder")
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
        # Resolved once per process: taro-vllm serve / taro_llm already did it when the engine runs in-process.
        self.setup = validate_setup(model_config.model, router_path, getattr(hf, "taro_reward_model", None))
        self.defaults = TaroDefaults.from_hf_config(hf)  # refuses bad server defaults at start-up

        base_hf = copy.deepcopy(hf)
        base_hf.architectures = _original_architectures(self.setup)
        base_hf.taro_role = "base"
        reward_hf = get_config(self.setup.reward_path, trust_remote_code=model_config.trust_remote_code)
        reward_hf.taro_role = "reward"
        from taro_vllm.serving.plugin import check_engine_config

        check_engine_config(vllm_config, reward_hf, self.setup.reward_path)  # before a minute of weight loading
        self.base = init_vllm_registered_model(vllm_config, hf_config=base_hf, prefix=maybe_prefix(prefix, "base"))
        with set_model_tag("taro_reward"):
            self.reward = init_vllm_registered_model(
                vllm_config, hf_config=reward_hf, prefix=maybe_prefix(prefix, "reward")
            )
        self.hidden_sizes = [base_hf.hidden_size, reward_hf.hidden_size]
        self.secondary_weights = [
            DefaultModelLoader.Source(self.setup.reward_path, None, prefix="reward.", fall_back_to_pt=False)
        ]
        self.check_weights = weight_check_enabled(hf)  # NaN/inf check in load_weights
        # The router is tiny: keep it in fp32 whatever the served dtype, as it was trained.
        self.router = build_router(self.setup.router_config.router).float()  # weights: load_weights
        # More routers (--taro-router NAME=CKPT ...): checked like the first, built and loaded now (they are tiny and
        # not submodules: routers can be loaded and unloaded at run time). Rows pick one by slot (routers.py).
        names = served_routers(hf)
        self.routers = RouterSet(next(iter(names)), self.router)
        for name, path in list(names.items())[1:]:
            self.load_router(name, path)
        self.make_empty_intermediate_tensors = getattr(self.base, "make_empty_intermediate_tensors", None)

        # Explicit devices: host tables for the feeders, the device buffer on the model's device (never whatever
        # torch.device context vLLM builds the model under).
        self.rows = RowState(vllm_config.scheduler_config.max_num_seqs, self.defaults.weight,
                             device=vllm_config.device_config.device)
        self.eos_token_id = getattr(hf, "eos_token_id", None)
        self.rows.router_slot_for = self._router_slot
        register_rows(vllm_config, self.rows)  # where this engine's V1 feeder finds them (rows.py)
        self.sampled = SampledLogprobs()  # taro_logprobs: compute_logits -> the sampler hook (sampled.py)

    # --- routers --------------------------------------------------------------------------------------------------

    def load_router(self, name: str, path: str) -> None:
        """Add a router (start-up or run time): checked against this engine's models, weights loaded, then made
        visible to new requests. ValueError (a TaroSetupError) when it does not fit."""
        setup = validate_extra_router(self.setup, path)
        router = build_router(setup.router_config.router).float()
        router.load_state_dict({k: v.float() for k, v in setup.router_state.items()})
        device = next(self.router.parameters()).device
        self.routers.add(name, router.to(device).eval(), str(path))

    def unload_router(self, name: str) -> None:
        self.routers.remove(name)

    def _router_slot(self, name: str | None) -> int:
        slot = self.routers.slot(name)
        if slot < 0:  # unloaded after the request was admitted (admission checks names): the default serves it
            logger.error("TARo: request asked for router %r, which is not loaded; it gets the default router %r",
                         name, self.routers.default_name)
            return 0
        return slot

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
        """Both heads -> per-row weights -> the mix. No host-device sync when no row is traced (one when one is).

        Rows where a model produced NaN/+inf are served by the other model alone (a forced to 0 or 1 before the mix,
        so the mix copies the finite model exactly); rows where both did end the sequence (EOS only). All of it
        branch-free on the device; the rows are counted on the device and logged when the count is read (the
        ``taro_nonfinite_rows`` metric). Never sampled from garbage.
        """
        h_base, h_reward = hidden_states.split(self.hidden_sizes, dim=-1)
        z_base = self.base.compute_logits(h_base)
        z_reward = self.reward.compute_logits(h_reward)
        if z_base is None:  # not the last pipeline rank
            return None
        z_reward_own, z_reward = z_reward, mix.align_vocab(z_reward, z_base)
        with self.rows.lock:
            override, trace, needs_router, groups = self.rows.take(z_base.shape[0], z_base.device)
            logprob_rows = self.rows.taken_logprob_rows
        override, dead, broken = self._route_around_nonfinite(z_base, z_reward, override)
        router = self.router if groups is None else GroupedRouters(self.routers, groups)
        res = mix.route_and_mix(z_base, z_reward, router=router, override=override, needs_router=needs_router)
        logits = res.logits.masked_fill_(dead[:, None], float("-inf"))
        alpha = torch.where(dead, float("nan"), res.alpha)
        eos = self._eos_columns(logits.device)
        if eos is not None:  # rows where both models are broken: EOS only
            logits.index_copy_(1, eos, torch.where(dead[:, None], 0.0, logits.index_select(1, eos)))
        traced = [i for i, key in enumerate(trace) if key is not None] if trace is not None else ()
        if traced and self.sampled.hook_v1_caller(sys._getframe(1)):
            # Traced rows are recorded after the sampler, if they sampled, with the log-probs of the token sampled
            # where asked (taro_logprobs; sampled.py).
            trace = self.sampled.stash(np.asarray(traced, dtype=np.int64), trace, alpha, z_base, z_reward_own,
                                       logprob_rows)
        alpha_recording.RECORDER.record(alpha, trace, nonfinite_rows=broken)
        return logits

    def _eos_columns(self, device: torch.device) -> torch.Tensor | None:
        """The EOS id(s) (an int or a list in HF configs) as a device index, made once (no per-step copy)."""
        cached = getattr(self, "_eos_index", None)
        if cached is None or cached.device != device:
            eos = self.eos_token_id
            if eos is None:
                return None
            ids = [eos] if isinstance(eos, int) else list(eos)
            cached = self._eos_index = torch.tensor(ids, dtype=torch.long, device=device)
        return cached

    @staticmethod
    def _route_around_nonfinite(z_base: torch.Tensor, z_reward: torch.Tensor, override: torch.Tensor | None):
        """Per-row override forcing the finite model where the other one holds NaN/+inf; rows where both do.

        -inf entries are masks, not damage: a row's max is NaN iff it holds a NaN, +inf iff it holds a +inf.
        """
        def broken(z: torch.Tensor) -> torch.Tensor:
            m = z.amax(dim=-1).float()
            return torch.isnan(m) | torch.isposinf(m)

        base_bad, reward_bad = broken(z_base), broken(z_reward)
        nan = torch.full_like(base_bad, float("nan"), dtype=torch.float32)
        current = override.float() if override is not None else nan
        forced = torch.where(base_bad, 1.0, torch.where(reward_bad, 0.0, current))
        dead = base_bad & reward_bad
        forced = torch.where(dead, 0.0, forced)  # any finite weight: the row is replaced by EOS after the mix
        return forced, dead, base_bad | reward_bad

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        from vllm.model_executor.models.utils import AutoWeightsLoader

        finite = FiniteWeights() if self.check_weights else None

        def route():
            for name, tensor in weights:
                if finite is not None:
                    finite.add(name, tensor)  # one on-device reduction per tensor, read once below
                yield (name if name.startswith("reward.") else f"base.{name}"), tensor

        loaded = AutoWeightsLoader(self).load_weights(route())
        if finite is not None:
            finite.raise_if_any({**tensor_sources(self.setup.base_path, "base model"),
                                 **tensor_sources(self.setup.reward_path, "reward model", prefix="reward.")},
                                fix=f"--taro-no-weight-check or {NO_WEIGHT_CHECK_ENV}=1 serves it anyway")
        # The router's weights were read and validated once, by validate_setup.
        with torch.no_grad():
            for name, p in self.router.named_parameters():
                p.copy_(self.setup.router_state[name].to(p.dtype))
        loaded |= {f"router.{n}" for n, _ in self.router.named_parameters()}
        return loaded

    def get_model_state_cls(self):
        """vLLM's V2 GPU model runner asks the model for its per-request state (see rows.py)."""
        from taro_vllm.serving.rows import TaroModelState

        return TaroModelState
