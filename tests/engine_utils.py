"""Shared helpers for the engine tests: prompts, routers, plain-vLLM references (run in a subprocess)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from taro_vllm.checkpoint import save_router, tokenizer_fingerprint
from taro_vllm.router import RouterConfig, build_router

ENGINE_ENV = {
    "VLLM_CPU_KVCACHE_SPACE": "1",
    "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
    "HF_HUB_OFFLINE": "1",
    "TOKENIZERS_PARALLELISM": "false",
}
for _k, _v in ENGINE_ENV.items():
    os.environ.setdefault(_k, _v)

_TEXT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
         "How many clips did Natalia sell altogether in April and May? Step 1: In May she sold 48 / 2 = 24. ")


def prompts(tokenizer) -> list[list[int]]:
    """Token-id prompts of 7 to ~400 tokens: the long ones span several 128-token KV blocks."""
    ids = tokenizer(_TEXT * 12)["input_ids"]
    return [ids[:7], ids[:150], ids[:290], ids[:410]]


def make_router(path: Path, base: Path, reward: Path, *, kind: str = "topk", std: float = 0.05, seed: int = 0,
                vocab_size: int = 49152) -> Path:
    """A router with random (not freshly initialised) weights: a_t varies per token in roughly (0.2, 0.8).

    Every parameter is overwritten, so init_bias plays no part; input_scale=1.0 feeds the log-probs unscaled, which
    keeps these N(0, std) weights (bit for bit the ones of checkpoint format 1 for a seed) producing that spread of
    a_t. With the default 0.1 the same weights give a_t within about 0.44-0.49 on the tiny models.
    """
    torch.manual_seed(seed)
    router = build_router(RouterConfig(kind=kind, vocab_size=vocab_size, input_scale=1.0))
    for p in router.parameters():
        torch.nn.init.normal_(p, std=std)
    return save_router(path, router, tokenizer_fingerprint=tokenizer_fingerprint(base), base_model=str(base),
                       reward_model=str(reward))


REFERENCE_SCRIPT = r"""
import json, sys
from vllm import LLM, SamplingParams
from vllm.inputs import TokensPrompt
if __name__ == "__main__":
    spec = json.load(open(sys.argv[1]))
    out = {}
    for name in spec["models"]:
        llm = LLM(model=name, dtype=spec["dtype"], max_model_len=spec["max_model_len"], seed=0,
                  enforce_eager=spec["eager"])
        sp = SamplingParams(max_tokens=spec["max_tokens"], temperature=0, logprobs=2, ignore_eos=True)
        res = llm.generate([TokensPrompt(prompt_token_ids=p) for p in spec["prompts"]], sp, use_tqdm=False)
        out[name] = [{"ids": list(r.outputs[0].token_ids),
                      "top2": [[lp.logprob for lp in sorted(d.values(), key=lambda x: x.rank)][:2]
                               for d in r.outputs[0].logprobs]} for r in res]
        del llm
    json.dump(out, open(sys.argv[2], "w"))
"""


def plain_vllm_greedy(tmp: Path, models: list[str], prompt_ids: list[list[int]], *, max_tokens: int,
                      dtype: str = "float32", eager: bool = False, max_model_len: int = 1024) -> dict:
    """Greedy output of stock vLLM (no TARo) for each model, from a fresh process."""
    spec = tmp / "spec.json"
    spec.write_text(json.dumps({"models": models, "prompts": prompt_ids, "max_tokens": max_tokens,
                                "dtype": dtype, "eager": eager, "max_model_len": max_model_len}))
    script = tmp / "ref.py"
    script.write_text(REFERENCE_SCRIPT)
    out = tmp / "ref.json"
    env = {**os.environ, **ENGINE_ENV, "VLLM_PLUGINS": "none"}  # stock vLLM: our plugin not even loaded
    r = subprocess.run([sys.executable, str(script), str(spec), str(out)], env=env, capture_output=True, text=True,
                       timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    return json.loads(out.read_text())
