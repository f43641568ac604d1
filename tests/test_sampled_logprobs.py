"""taro_logprobs without an engine (taro_vllm/serving/sampled.py): compute_logits stashes the traced rows' a_t and
the asking rows' log-softmax, the wrapped sampler gathers them at the sampled token and records a_t + both log-probs
together, only for rows that sampled (a prefill chunk records nothing, a_t included).

Stand-ins for vLLM's two samplers (the V1 one is an nn.Module called through ``forward``, the V2 one a plain class
called through ``__call__``) and for the V1 runner's ``discard_request_mask``. The real model through the real V2
model state: tests/test_v2_runner.py; the real server: tests/test_serving_alphas.py."""

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from taro_vllm.serving.alphas import AlphaRecorder
from taro_vllm.serving.options import options_or_default, parse_options, TaroDefaults
from taro_vllm.serving.sampled import SampledLogprobs, hook_v1_runner, hook_v2_sampler, logprobs_at

PARENT = "cmpl-1-0-ab12cd34"


class V1Sampler(torch.nn.Module):
    """vLLM V1's sampler in miniature: greedy, returns [N, 1] token ids."""

    marker = "v1"

    def forward(self, logits, sampling_metadata=None):
        return SimpleNamespace(sampled_token_ids=logits.argmax(-1, keepdim=True).int(), logprobs_tensors=None)


class V2Sampler:
    """vLLM V2's sampler in miniature: rows whose prefill is not complete sample nothing (num_sampled 0)."""

    def __init__(self):
        self.partial = set()

    def __call__(self, logits, input_batch=None):
        n = logits.shape[0]
        return SimpleNamespace(sampled_token_ids=logits.argmax(-1, keepdim=True).int(),
                               num_sampled=torch.tensor([0 if i in self.partial else 1 for i in range(n)]))


def step_logits(seed: int, rows: int = 3, vocab: int = 11):
    g = torch.Generator().manual_seed(seed)
    z_base = torch.randn(rows, vocab, generator=g)
    z_reward = torch.randn(rows, vocab + 2, generator=g)  # the reward's own (wider, padded) table
    alpha = torch.rand(rows, generator=g)
    mixed = (1 - alpha[:, None]) * z_base + alpha[:, None] * z_reward[:, :vocab]
    return z_base, z_reward, alpha, mixed


def run_step(sampled: SampledLogprobs, recorder: AlphaRecorder, sampler, trace, asked, seed):
    """What model.compute_logits then the runner do in one step; returns (the step's logits parts, tokens)."""
    z_base, z_reward, alpha, mixed = step_logits(seed, rows=len(trace))
    traced = np.array([i for i, key in enumerate(trace) if key is not None])
    trace = sampled.stash(traced, trace, alpha, z_base, z_reward, np.asarray(asked))
    recorder.record(alpha, trace)
    tokens = sampler(mixed).sampled_token_ids[:, 0]
    return (z_base, z_reward, alpha), tokens


def expected(parts, tokens, row):
    z_base, z_reward, alpha = parts
    t = int(tokens[row])
    return (float(alpha[row]), float(torch.log_softmax(z_base[row], -1)[t]),
            float(torch.log_softmax(z_reward[row], -1)[t]))


def test_logprobs_at_gathers_each_row_at_its_token_and_outside_the_vocabulary_is_minus_inf():
    logp = torch.log_softmax(torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, -1.0]]), -1)
    got = logprobs_at(logp, torch.tensor([2, 0], dtype=torch.int32))
    assert torch.equal(got, torch.stack([logp[0, 2], logp[1, 0]]))
    assert logprobs_at(logp, torch.tensor([1, 3]))[1] == float("-inf")  # a token this model has no row for


def test_v1_sampler_records_a_t_and_both_logprobs_of_the_sampled_token_only_for_rows_that_sampled():
    recorder = AlphaRecorder()
    sampled = SampledLogprobs(recorder)
    runner = SimpleNamespace(sampler=V1Sampler(), discard_request_mask=SimpleNamespace(np=np.zeros(8, dtype=bool)))
    hook_v1_runner(runner, sampled)
    assert isinstance(runner.sampler, V1Sampler) and runner.sampler.marker == "v1"  # still vLLM's sampler
    # Rows: 0 asks, 1 traced without asking, 2 untraced; row 0's 2nd step and row 1's 1st are prefill chunks
    # (nothing sampled).
    trace = [("lp", f"0_{PARENT}"), ("plain", "r1"), None]
    want, want_plain = [], []
    for step in range(3):
        runner.discard_request_mask.np[:2] = [step == 1, step == 0]
        parts, tokens = run_step(sampled, recorder, runner.sampler, trace, [0], seed=step)
        if step != 1:
            want.append(expected(parts, tokens, 0))
        if step != 0:
            want_plain.append(expected(parts, tokens, 1)[0])
    assert sampled.pending is None  # each stash was consumed by its step's sampler call
    got = recorder.pop_trace("lp")
    assert set(got) == {"alphas", "base_logprobs", "reward_logprobs"}
    assert got["alphas"] == pytest.approx([w[0] for w in want], abs=1e-7)
    assert got["base_logprobs"] == pytest.approx([w[1] for w in want], abs=1e-6)
    assert got["reward_logprobs"] == pytest.approx([w[2] for w in want], abs=1e-6)
    assert got["base_logprobs"] != got["reward_logprobs"]
    assert recorder.pop_trace("plain") == {"alphas": pytest.approx(want_plain, abs=1e-7)}  # a_t only, no chunk
    assert recorder.stats()["count"] == 9  # the histogram counts every row of every step, as before


def test_v2_sampler_skips_rows_with_nothing_sampled_and_keeps_choices_apart():
    recorder = AlphaRecorder()
    sampled = SampledLogprobs(recorder)
    sampler = hook_v2_sampler(V2Sampler(), sampled)
    assert type(sampler).__name__ == "V2Sampler" and isinstance(sampler, V2Sampler)
    trace = [("n2", f"1_{PARENT}"), ("n2", f"0_{PARENT}")]  # rows in another order than the choices
    per_choice = {0: [], 1: []}
    for step in range(3):
        sampler.partial = {1} if step == 0 else set()  # choice 0's first step: a prefill chunk
        parts, tokens = run_step(sampled, recorder, sampler, trace, [0, 1], seed=10 + step)
        per_choice[1].append(expected(parts, tokens, 0))
        if step:
            per_choice[0].append(expected(parts, tokens, 1))
    got = recorder.pop_trace("n2")["choices"]
    assert [c["index"] for c in got] == [0, 1]
    for c in got:
        want = per_choice[c["index"]]
        assert len(c["alphas"]) == len(c["base_logprobs"]) == len(c["reward_logprobs"]) == len(want)
        assert c["base_logprobs"] == pytest.approx([w[1] for w in want], abs=1e-6)
        assert c["reward_logprobs"] == pytest.approx([w[2] for w in want], abs=1e-6)


def test_without_a_hooked_sampler_nothing_is_stashed_and_a_t_is_recorded_as_before():
    recorder = AlphaRecorder()
    sampled = SampledLogprobs(recorder)
    trace = [("t", "r0")]
    run_step(sampled, recorder, V1Sampler(), trace, [0], seed=1)
    assert sampled.pending is None
    assert recorder.pop_trace("t") == {"alphas": [pytest.approx(float(step_logits(1, 1)[2][0]))]}


def test_a_sampler_call_of_another_shape_records_nothing_and_drops_the_stash():
    """A dummy sampler run (warm-up) between a stash and its step, or several tokens per row: no guessing."""
    recorder = AlphaRecorder()
    sampled = SampledLogprobs(recorder)
    sampler = hook_v2_sampler(V2Sampler(), sampled)
    z_base, z_reward, alpha, _ = step_logits(0, rows=2)
    sampled.stash(np.array([1]), [None, ("t", "r")], alpha, z_base, z_reward, np.array([1]))
    sampler(torch.zeros(5, 11))
    assert sampled.pending is None and recorder.pop_trace("t") is None


def test_recorded_logprobs_are_json_values_and_reads_are_incremental():
    recorder = AlphaRecorder()
    recorder.record_sampled([("t", "r")], [0.5], [float("-inf")], [float("nan")])
    recorder.record_sampled([("t", "r")], [0.25], [-1.5], [-0.5])
    assert recorder.read_new(["t"]) == {"t": {"0": {"alphas": [0.5, 0.25], "base_logprobs": [-9999.0, -1.5],
                                                    "reward_logprobs": [None, -0.5]}}}
    recorder.record_sampled([("t", "r")], [0.75], [-2.0], [-3.0])
    assert recorder.read_new(["t"]) == {"t": {"0": {"alphas": [0.75], "base_logprobs": [-2.0],
                                                    "reward_logprobs": [-3.0]}}}
    # A row of the same trace recorded without log-probs stays aligned: null there.
    recorder.record(torch.tensor([0.125]), [("t", "r")])
    assert recorder.pop_trace("t")["base_logprobs"] == [-9999.0, -1.5, -2.0, None]


def test_the_option_rides_on_taro_alphas_and_reaches_the_row():
    with pytest.raises(ValueError, match='taro_logprobs adds .* set "taro_alphas": true too'):
        parse_options({"taro_logprobs": True})
    with pytest.raises(ValueError, match="taro_logprobs must be true or false"):
        parse_options({"taro_alphas": True, "taro_trace": "t", "taro_logprobs": 1})
    opts = options_or_default({"taro_alphas": True, "taro_trace": "t", "taro_logprobs": True}, TaroDefaults())
    assert opts.logprobs and opts.trace == "t"
    assert not options_or_default({"taro_alphas": True, "taro_trace": "t"}, TaroDefaults()).logprobs
