"""Another architecture: a tiny Qwen2 base with a Qwen2 reward whose vocab is padded by 64 rows (eager, fp32; the
compiled path is covered on the Llama pair in test_serving_llm.py, and compiling four more models costs the suite
about half a minute).

The stock-vLLM references run eager too: like is compared with like."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine_utils import make_router, plain_vllm_greedy, prompts

pytestmark = pytest.mark.engine
MAX_TOKENS = 16


@pytest.fixture(scope="module")
def pair(tiny_paths):
    return tiny_paths["tiny-qwen2-base"], tiny_paths["tiny-qwen2-reward"]


@pytest.fixture(scope="module")
def prompt_ids(tokenizer):
    return prompts(tokenizer)[:3]


@pytest.fixture(scope="module")
def llm(pair, tmp_path_factory):
    from taro_vllm.serving.llm import taro_llm

    router = make_router(tmp_path_factory.mktemp("router") / "ckpt", *pair)
    engine = taro_llm(str(pair[0]), str(router), dtype="float32", max_model_len=1024, seed=0, enforce_eager=True)
    yield engine
    del engine


def run(llm, prompt_ids, extra_args, logprobs=None):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    sp = SamplingParams(max_tokens=MAX_TOKENS, temperature=0, ignore_eos=True, extra_args=extra_args,
                        logprobs=logprobs)
    return llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompt_ids], sp, use_tqdm=False)


def test_qwen2_pair_a0_a1_and_fixed_half(llm, pair, prompt_ids, tmp_path):
    from taro_vllm.hf_generate import generate_mixed

    ref = plain_vllm_greedy([str(p) for p in pair], prompt_ids, max_tokens=MAX_TOKENS, eager=True)
    base_out = [list(o.outputs[0].token_ids) for o in run(llm, prompt_ids, {"taro_mode": "base"})]
    reward_out = [list(o.outputs[0].token_ids) for o in run(llm, prompt_ids, {"taro_mode": "reward"})]
    assert base_out == [r["ids"] for r in ref[str(pair[0])]]
    assert reward_out == [r["ids"] for r in ref[str(pair[1])]]

    base = AutoModelForCausalLM.from_pretrained(pair[0], dtype=torch.float32).eval()
    reward = AutoModelForCausalLM.from_pretrained(pair[1], dtype=torch.float32).eval()
    hf = generate_mixed(base, reward, prompt_ids, MAX_TOKENS, alpha=0.5)
    half = run(llm, prompt_ids, {"taro_alpha": 0.5}, logprobs=0)
    for h, o in zip(hf, half):
        assert list(o.outputs[0].token_ids) == h.token_ids
        assert max(o.outputs[0].token_ids) < 49152  # the mix is over the shared tokenizer's vocabulary
