"""The hand-off from a request to its batch row: the per-row weight table, and the feeders that fill it.

vLLM never shows the model a request's ``SamplingParams``: ``compute_logits`` only sees one row of logits per running
request. So each engine has one :class:`RowState` (made by the model, ``TaroForCausalLM.rows``), and a feeder writes
every admitted request's weight (options.py) and trace id into its row before the step's forward pass:

* V1 model runner (CPU; GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``): :class:`TaroLogitsProcessor.update_state` follows
  the persistent batch (removed, then added, then moved, as vLLM's ``BatchUpdate`` orders them). vLLM builds it
  from the VllmConfig before the model exists, so it finds its engine's RowState in :data:`_ENGINES`, keyed by that
  VllmConfig (the model registers there); two engines in one process never share rows.
* V2 model runner (the GPU default in vLLM 0.32): :class:`TaroModelState`, which vLLM asks the model for
  (``get_model_state_cls``), holds per-slot weights and lays them out in row order in ``prepare_inputs``; it has the
  model, so it needs no registry. ``TaroLogitsProcessor`` there only validates options at admission.

The model consumes the rows with ``RowState.take`` inside ``compute_logits``.
"""

from __future__ import annotations

import logging
import math
import sys
import threading
import weakref
from typing import Any, NamedTuple

import numpy as np
import torch

from taro_vllm.serving.options import TaroDefaults, options_or_default, parse_options

logger = logging.getLogger("taro_vllm")

# A traced row's key for the a_t recorder: (taro_trace, engine request id). The request id tells the n samples of one
# request apart (each is its own engine request); None when the runner did not say (then they share one list).
TraceKey = tuple[str, "str | None"]


class RowsStep(NamedTuple):
    """What one step's rows ask of the model (``RowState.take``)."""

    override: torch.Tensor | None  # [N] weights on the device, NaN = a router; None: every row uses a router
    trace: list[TraceKey | None] | None  # per row: where to record its a_t (None: not a sampling call)
    needs_router: bool  # some row uses a router
    groups: list[tuple[int, torch.Tensor]] | None  # [(router slot, device row index)]; None: the default router only


def _pin_memory_available() -> bool:
    try:
        return torch.cuda.is_available()
    except Exception:  # pragma: no cover - broken CUDA install: pageable memory still works
        return False


class RowState:
    """Per-row TARo settings of the running batch, shared by the feeder and the model in one worker process.

    Where each piece lives (explicitly, whatever ``torch.device`` context the model is built under):

    * ``override`` - the feeder's per-row table, host numpy (the feeders write it row by row);
    * two staging buffers, host, pinned when CUDA is present - ``begin_step`` snapshots the step's rows into one of
      them (alternating, so a host write never races a copy still in flight from the step before);
    * the model's device buffer (on ``device``, or on the device of the logits when that differs) - ``take`` issues
      one non-blocking copy into it.

    ``begin_step`` is called by the feeder once per scheduler step, before the forward pass; it also computes, on
    the host, whether any row uses the router and whether any row is overridden, so the model never has to ask the
    device. The model consumes the step in the first ``compute_logits`` call whose row count matches (later calls
    in the same step, e.g. prompt logprobs, use the router and the server default only).
    """

    def __init__(self, max_rows: int, default_weight: float = math.nan, device: torch.device | str = "cpu"):
        self.default_weight = default_weight
        self.override = np.full((max_rows,), default_weight, dtype=np.float32)
        self.trace: list[TraceKey | None] = [None] * max_rows
        self.router_slot = np.zeros((max_rows,), dtype=np.int64)  # the router of each row (routers.py; 0 = default)
        self.logprobs = np.zeros((max_rows,), dtype=bool)  # taro_logprobs: record the models' log-probs (sampled.py)
        self._logprob_rows: np.ndarray | None = None  # this step's rows asking for them (host, set by begin_step)
        self.taken_logprob_rows: np.ndarray | None = None  # what the last fresh take handed the model
        self.router_slot_for = lambda name: 0  # router name -> slot; the model sets it to its RouterSet's
        self._groups: list[tuple[int, np.ndarray]] | None = None
        self.num_rows = 0
        self.fresh = False
        self.needs_router = math.isnan(default_weight)
        self.all_router = self.needs_router
        self.lock = threading.Lock()
        pin = _pin_memory_available()
        self._staging = [torch.full((max_rows,), default_weight, dtype=torch.float32, device="cpu", pin_memory=pin)
                         for _ in range(2)]
        self._staging_np = [t.numpy() for t in self._staging]  # host views, for writes without torch ops
        self._which = 0
        self.device = torch.device(device)
        self.device_override = torch.full((max_rows,), default_weight, dtype=torch.float32, device=self.device)

    def ensure(self, rows: int) -> None:
        if rows > self.override.shape[0]:
            extra = rows - self.override.shape[0]
            self.override = np.concatenate([self.override, np.full((extra,), self.default_weight, np.float32)])
            self.router_slot = np.concatenate([self.router_slot, np.zeros((extra,), np.int64)])
            self.logprobs = np.concatenate([self.logprobs, np.zeros((extra,), bool)])
            self.trace.extend([None] * extra)

    def set_row(self, i: int, weight: float, trace: TraceKey | None, router_slot: int = 0,
                logprobs: bool = False) -> None:
        self.ensure(i + 1)
        self.override[i] = weight
        self.trace[i] = trace
        self.router_slot[i] = router_slot
        self.logprobs[i] = logprobs and trace is not None  # recorded under the trace: nothing to record without one

    def clear_row(self, i: int) -> None:
        self.set_row(i, self.default_weight, None)

    def move(self, src: int, dst: int, swap: bool) -> None:
        self.ensure(max(src, dst) + 1)
        if swap:
            self.override[[src, dst]] = self.override[[dst, src]]
            self.router_slot[[src, dst]] = self.router_slot[[dst, src]]
            self.logprobs[[src, dst]] = self.logprobs[[dst, src]]
            self.trace[src], self.trace[dst] = self.trace[dst], self.trace[src]
        else:
            self.override[dst] = self.override[src]
            self.router_slot[dst] = self.router_slot[src]
            self.logprobs[dst] = self.logprobs[src]
            self.trace[dst] = self.trace[src]

    def begin_step(self, num_rows: int) -> None:
        self.ensure(num_rows)
        self.num_rows = num_rows
        self.fresh = True
        self._which ^= 1
        if self._staging[self._which].numel() < num_rows:
            self._staging[self._which] = torch.empty((num_rows,), dtype=torch.float32, device="cpu",
                                                     pin_memory=_pin_memory_available())
            self._staging_np[self._which] = self._staging[self._which].numpy()
        w = self.override[:num_rows]
        self._staging_np[self._which][:num_rows] = w  # host memcpy
        nan = np.isnan(w)
        self.needs_router = bool(nan.any())
        self.all_router = bool(nan.all())
        # Rows of one step may use different routers: one row index per router used (numpy, no loop over rows).
        slots = self.router_slot[:num_rows]
        used = np.unique(slots[nan]) if self.needs_router else ()
        if len(used) == 0 or (len(used) == 1 and used[0] == 0):
            self._groups = None
        else:
            self._groups = [(int(r), np.flatnonzero(nan & (slots == r))) for r in used]
        asked = self.logprobs[:num_rows]
        self._logprob_rows = np.flatnonzero(asked) if asked.any() else None

    def _device_buffer(self, rows: int, device: torch.device) -> torch.Tensor:
        if self.device_override.device != device or self.device_override.numel() < rows:
            self.device = device
            self.device_override = torch.full((max(rows, self.override.shape[0]),), self.default_weight,
                                              dtype=torch.float32, device=device)
        return self.device_override[:rows]

    def take(self, rows: int, device: torch.device | str = "cpu") -> RowsStep:
        """Overrides on ``device`` (None when nothing is overridden), trace ids, whether a router must run, and which
        rows use which router when they are not all the default one.

        Never reads from the device: the flags were computed on the host by ``begin_step``, and the overrides reach
        the device by one non-blocking copy from pinned memory. Trace ids are None for calls that are not a step's
        sampling call (warm-up, profiling, prompt logprobs): their a_t are not recorded. The rows of a fresh step
        that asked for the models' log-probs (``taro_logprobs``) are left in ``taken_logprob_rows`` (host indices;
        None when no row asked).
        """
        device = torch.device(device)
        self.taken_logprob_rows = None
        if not self.fresh or rows != self.num_rows:
            if math.isnan(self.default_weight):
                return RowsStep(None, None, True, None)
            return RowsStep(torch.full((rows,), self.default_weight, dtype=torch.float32, device=device), None,
                            False, None)
        self.fresh = False
        trace = self.trace[:rows]
        self.taken_logprob_rows = self._logprob_rows
        groups = None
        if self._groups is not None:
            groups = [(slot, torch.from_numpy(idx).to(device, non_blocking=True)) for slot, idx in self._groups]
        if self.all_router:
            return RowsStep(None, trace, True, groups)
        dev = self._device_buffer(rows, device)
        dev.copy_(self._staging[self._which][:rows], non_blocking=True)
        return RowsStep(dev, trace, self.needs_router, groups)


# engine (its VllmConfig, which vLLM hands to both the model and the V1 feeder) -> its RowState. Weak values: an
# engine's rows go with its model.
_ENGINES: "weakref.WeakValueDictionary[int, RowState]" = weakref.WeakValueDictionary()


def register_rows(vllm_config: Any, rows: RowState) -> None:
    _ENGINES[id(vllm_config)] = rows


def rows_for(vllm_config: Any) -> RowState | None:
    return _ENGINES.get(id(vllm_config))


def _processor_bases() -> tuple[type, ...]:
    from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

    return V1LogitsProcessor, V2LogitsProcessor


class TaroLogitsProcessor(*_processor_bases()):  # type: ignore[misc]
    """One class for both of vLLM's model runners, so nobody has to predict which one runs.

    * On the V1 runner (CPU, or GPU with ``VLLM_USE_V2_MODEL_RUNNER=0``) it is the feeder: it keeps the per-row
      overrides in step with the persistent batch (``update_state``).
    * On the V2 runner (the GPU default) ``TaroModelState`` feeds the rows; this class only validates ``taro_*``
      options at admission (vLLM's frontend builds its params validator from ``--logits-processors``, and the V2
      loader refuses V1-only classes). ``add_request`` returns False, so the sampler never copies logits for it.
    * ``validate_params`` (both runners) turns a bad option into a ``VLLMValidationError``: HTTP 400 online, a
      ``ValueError`` offline, before the request reaches the engine.

    Passed with ``--logits-processors taro_vllm.serving.rows:TaroLogitsProcessor`` (``taro-vllm serve``,
    ``vllm serve --taro-router`` and ``taro_llm`` add it; the model refuses to start without it). It is deliberately
    NOT registered as a ``vllm.logits_processors`` entry point: vLLM loads those for every model.
    """

    @classmethod
    def validate_params(cls, sampling_params) -> None:
        parse_options(sampling_params.extra_args)

    def __init__(self, vllm_config, *runner_args) -> None:
        # V1: (vllm_config, device, is_pin_memory); V2: (vllm_config, LogitsProcRequestState).
        self.defaults = TaroDefaults.from_hf_config(vllm_config.model_config.hf_config)
        self.vllm_config = vllm_config
        self.rows: RowState | None = None

    def _rows(self) -> RowState | None:
        if self.rows is None:
            self.rows = rows_for(self.vllm_config)
        return self.rows

    # --- V2 interface: validation only ---------------------------------------------------------------------------

    def add_request(self, req_idx: int, sampling_params) -> bool:
        return False  # TaroModelState holds the per-request state; nothing to do to the sampler's logits

    def apply_staged_writes(self) -> None:
        pass

    # --- both -------------------------------------------------------------------------------------------------

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        return logits  # the mix happened in compute_logits

    # --- V1 interface: the feeder -----------------------------------------------------------------------------

    def is_argmax_invariant(self) -> bool:
        return True  # apply() changes nothing

    def update_state(self, batch_update) -> None:
        rows = self._rows()
        if rows is None:  # not a TARo engine: nothing to feed
            return
        with rows.lock:
            if batch_update is not None:
                for i in batch_update.removed:
                    rows.clear_row(i)
                traced = False
                for i, params, _prompt, _out in batch_update.added:
                    opts = options_or_default(params.extra_args, self.defaults)
                    rows.set_row(i, opts.weight, (opts.trace, None) if opts.trace is not None else None,
                                 rows.router_slot_for(opts.router), opts.logprobs)
                    traced |= opts.trace is not None
                from vllm.v1.sample.logits_processor import MoveDirectionality

                for src, dst, direction in batch_update.moved:
                    rows.move(src, dst, direction == MoveDirectionality.SWAP)
                if traced:
                    _name_traced_rows(rows, batch_update.batch_size)
                rows.begin_step(batch_update.batch_size)
            else:
                rows.begin_step(rows.num_rows)


def _v1_batch_req_ids() -> list | None:
    """The V1 runner's row -> request id list (``InputBatch.req_ids``), or None if it cannot be found.

    vLLM's V1 ``BatchUpdate`` gives a logits processor each added row's params but not its request id, and with
    ``n > 1`` the samples' params are identical (often the same object). ``InputBatch.refresh_metadata`` calls
    ``update_state`` with the batch already in its final row order, so the caller's ``_req_ids`` names every row.
    That is a vLLM internal, read by frame inspection (vllm 0.32); if an upgrade moves it, traces fall back to one
    list per trace id and ``tests/test_serving_llm.py::test_trace_with_n_gives_one_list_per_choice`` fails.
    """
    frame = sys._getframe(1)
    for _ in range(4):  # update_state's caller, tolerating a wrapper or two
        frame = frame.f_back
        if frame is None:
            return None
        owner = frame.f_locals.get("self")
        req_ids = getattr(owner, "_req_ids", None)
        if isinstance(req_ids, list) and hasattr(owner, "batch_update_builder"):
            return req_ids
    return None


def _name_traced_rows(rows: RowState, batch_size: int) -> None:
    """Give newly added traced rows their engine request id (rows moved since keep theirs). Runs only in a step
    that admits a traced request; without the runner's ids the samples of an ``n > 1`` request share one list."""
    req_ids = _v1_batch_req_ids()
    if req_ids is None:
        logger.warning("TARo: cannot read the V1 runner's request ids; with n > 1 a taro_trace holds the samples' "
                       "a_t in one list")
        return
    for i in range(min(batch_size, len(req_ids))):
        key = rows.trace[i]
        if key is not None and key[1] is None:
            rows.trace[i] = (key[0], req_ids[i])


def _v2_default_model_state() -> type:
    from vllm.v1.worker.gpu.model_states.default import DefaultModelState

    return DefaultModelState


class TaroModelState(_v2_default_model_state()):  # type: ignore[misc]
    """The V2 runner's per-request state for TARo: per-slot weight and trace id, laid out in row order each step.

    Host-device traffic per step: none from here (the slot -> row gather uses the runner's host copy
    ``input_batch.idx_mapping_np``; ``RowState.take`` moves the weights with one non-blocking copy). ``add_request``
    never raises: an exception there would kill EngineCore with every in-flight request (options were validated at
    admission). Tested on CPU against the real V2 classes (tests/test_v2_runner.py); not yet run on a GPU.
    """

    # Both sub-models need token ids (the reward model has its own embedding table): refuse prompt embeddings at
    # runner start-up (vLLM's init_model_state checks this flag) instead of failing in the profiling run.
    supports_prompt_embeds = False

    def __init__(self, vllm_config, model, encoder_cache, device):
        super().__init__(vllm_config, model, encoder_cache, device)
        self.defaults = model.defaults  # read once, by the model
        self.slot_weight = np.full((self.max_num_reqs,), model.rows.default_weight, dtype=np.float32)
        self.slot_router = np.zeros((self.max_num_reqs,), dtype=np.int64)
        self.slot_trace: list[tuple[str, str] | None] = [None] * self.max_num_reqs  # (taro_trace, request id)
        self.slot_logprobs = np.zeros((self.max_num_reqs,), dtype=bool)  # taro_logprobs
        self.slot_of: dict[str, int] = {}

    def add_request(self, req_index: int, new_req_data) -> None:
        super().add_request(req_index, new_req_data)
        params = new_req_data.sampling_params
        opts = options_or_default(params.extra_args if params is not None else None, self.defaults)
        self.slot_weight[req_index] = opts.weight
        self.slot_router[req_index] = self.model.rows.router_slot_for(opts.router)
        # Keyed by request id too: with n > 1 each sample is its own request and gets its own list (alphas.py).
        self.slot_trace[req_index] = (opts.trace, new_req_data.req_id) if opts.trace is not None else None
        self.slot_logprobs[req_index] = opts.logprobs
        self.slot_of[new_req_data.req_id] = req_index

    def remove_request(self, req_id: str) -> None:
        super().remove_request(req_id)
        slot = self.slot_of.pop(req_id, None)
        if slot is not None:
            self.slot_weight[slot] = self.model.rows.default_weight
            self.slot_router[slot] = 0
            self.slot_trace[slot] = None
            self.slot_logprobs[slot] = False

    def custom_sampler(self, sampler):
        """vLLM's hook for wrapping the V2 sampler: the wrapped one records, for rows that asked (``taro_logprobs``),
        a_t with the base's and the reward's log-prob of the token it sampled (sampled.py). Steps where no row
        asked cost one attribute check."""
        if self.vllm_config.speculative_config is not None:
            return None  # refused at start-up anyway (plugin.unsupported_setup); never replace the rejection sampler
        from taro_vllm.serving.sampled import hook_v2_sampler

        return hook_v2_sampler(sampler, self.model.sampled), None

    def prepare_inputs(self, input_batch, req_states):
        out = super().prepare_inputs(input_batch, req_states)
        rows = self.model.rows
        slots = np.asarray(input_batch.idx_mapping_np)[: input_batch.num_reqs]
        n = int(slots.shape[0])
        with rows.lock:
            rows.ensure(n)
            rows.override[:n] = self.slot_weight[slots]
            rows.router_slot[:n] = self.slot_router[slots]
            rows.logprobs[:n] = self.slot_logprobs[slots]
            for i, s in enumerate(slots.tolist()):
                rows.trace[i] = self.slot_trace[s]
            rows.begin_step(n)
        return out
