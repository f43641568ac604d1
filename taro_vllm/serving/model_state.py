"""Per-request TARo options on vLLM's V2 GPU model runner (the 0.32 default on CUDA).

The V2 runner asks the model for its ``ModelState`` (``TaroForCausalLM.get_model_state_cls``). Ours extends the
default state: ``add_request`` parses ``extra_args`` into a per-slot weight and trace id (host tables), and
``prepare_inputs`` (called every step before the forward pass) lays the slots out in batch-row order for
``compute_logits`` through the same :class:`~taro_vllm.serving.requests.RowState` the V1 feeder fills.

Host-device traffic per step: none from here. The slot -> row gather uses ``input_batch.idx_mapping_np`` (the
runner's host copy; ``idx_mapping`` is never read back), and ``RowState`` moves the row weights to the device with
one non-blocking copy from pinned memory inside ``compute_logits``.

Options are validated at admission (``TaroLogitsProcessor.validate_params``, HTTP 400); ``add_request`` never raises,
since an exception there would kill EngineCore with every in-flight request.

Tested on CPU against the real V2 classes (tests/test_v2_runner.py); not yet run on a GPU (see README).
"""

from __future__ import annotations

import numpy as np
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from taro_vllm.serving.requests import options_or_default


class TaroModelState(DefaultModelState):
    # Both sub-models need token ids (the reward model has its own embedding table): refuse prompt embeddings at
    # runner start-up (vLLM's init_model_state checks this flag) instead of failing in the profiling run.
    supports_prompt_embeds = False

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        hf = vllm_config.model_config.hf_config
        self.default_mode = getattr(hf, "taro_default_mode", None) or "router"
        self.default_alpha = getattr(hf, "taro_default_alpha", None)
        self.slot_weight = np.full((self.max_num_reqs,), model.rows.default_weight, dtype=np.float32)
        self.slot_trace: list[tuple[str, str] | None] = [None] * self.max_num_reqs  # (taro_trace, request id)
        self.slot_of: dict[str, int] = {}

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        weight, trace = options_or_default(params.extra_args if params is not None else None, self.default_mode,
                                           self.default_alpha, self.model.rows.default_weight)
        self.slot_weight[req_index] = weight
        # Keyed by request id too: with n > 1 each sample is its own request and gets its own list (alphas.py).
        self.slot_trace[req_index] = (trace, new_req_data.req_id) if trace is not None else None
        self.slot_of[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self.slot_weight[slot] = self.model.rows.default_weight
            self.slot_trace[slot] = None

    def prepare_inputs(self, input_batch, req_states):
        out = super().prepare_inputs(input_batch, req_states)
        rows = self.model.rows
        slots = np.asarray(input_batch.idx_mapping_np)[: input_batch.num_reqs]
        n = int(slots.shape[0])
        with rows.lock:
            rows.ensure(n)
            rows.override[:n] = self.slot_weight[slots]
            for i, s in enumerate(slots.tolist()):
                rows.trace[i] = self.slot_trace[s]
            rows.begin_step(n)
        return out
