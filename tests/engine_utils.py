"""Shared helpers for the engine tests: prompts, routers, plain-vLLM references (run in a subprocess)."""

from __future__ import annotations

import os
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


def plain_vllm_greedy(models: list[str], prompt_ids: list[list[int]], *, max_tokens: int, dtype: str = "float32",
                      eager: bool = False, max_model_len: int = 1024) -> dict:
    """Greedy output of stock vLLM (no TARo; our plugin not even loaded) for each model, from a fresh process:
    {model: [{"ids", "top2", "logprobs"} per prompt]}."""
    from benchmarks.engine_run import in_fresh_process

    spec = {"worker": "greedy", "models": models, "prompts": prompt_ids, "max_tokens": max_tokens, "dtype": dtype,
            "eager": eager, "max_model_len": max_model_len}
    out = in_fresh_process(spec, env={**os.environ, **ENGINE_ENV, "VLLM_PLUGINS": "none"}, timeout=900)
    return {name: runs["default"] for name, runs in out.items()}
