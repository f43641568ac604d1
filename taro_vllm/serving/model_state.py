"""Per-request TARo options on vLLM's V2 GPU model runner (the 0.32 default on CUDA).

The V2 runner asks the model for its ``ModelState`` (``TaroForCausalLM.get_model_state_cls``). Ours extends the
default state: ``add_request`` parses ``extra_args`` into a per-slot override, and ``prepare_inputs`` (called every
step before the forward pass) lays the slots out in batch-row order for ``compute_logits``, through the same
:class:`~taro_vllm.serving.requests.RowState` the V1 feeder fills. Written against vLLM 0.32's source; NOT yet run
on a GPU (see README).
"""

from __future__ import annotations


import torch
from vllm.v1.worker.gpu.model_states.default import DefaultModelState

from taro_vllm.serving.requests import parse_options


class TaroModelState(DefaultModelState):
    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        hf = vllm_config.model_config.hf_config
        self.default_mode = getattr(hf, "taro_default_mode", None) or "router"
        self.default_alpha = getattr(hf, "taro_default_alpha", None)
        self.slot_weight = torch.full((self.max_num_reqs,), model.rows.default_weight, dtype=torch.float32)
        self.slot_trace: list[str | None] = [None] * self.max_num_reqs
        self.slot_of: dict[str, int] = {}

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        opts = parse_options(params.extra_args if params is not None else None)
        self.slot_weight[req_index] = opts.weight(self.default_mode, self.default_alpha)
        self.slot_trace[req_index] = opts.taro_trace
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
        slots = input_batch.idx_mapping.cpu()
        n = int(slots.numel())
        with rows.lock:
            rows.ensure(n)
            rows.override[:n] = self.slot_weight[slots]
            for i, s in enumerate(slots.tolist()):
                rows.trace[i] = self.slot_trace[s]
            rows.begin_step(n)
        return out
