"""Two-model decoding with Hugging Face transformers: the reference for the plugin and the GenARM-style baseline.

Both models keep their own KV cache; every step runs both, mixes with :mod:`taro_vllm.mix` and picks the next token.
``batch_size=1`` reproduces GenARM's released decoding loop (one prompt at a time); larger batches left-pad prompts.
Greedy or temperature sampling; returns token ids, the log-prob of each chosen token under the mixed distribution,
and the a_t used at each step.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from taro_vllm import mix
from taro_vllm.router import Router


@dataclass
class MixedGeneration:
    token_ids: list[int]
    logprobs: list[float] = field(default_factory=list)
    alphas: list[float] = field(default_factory=list)


def _pick(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


@torch.inference_mode()
def generate_mixed(
    base,
    reward,
    prompts: list[list[int]],
    max_new_tokens: int,
    *,
    alpha: float | None = None,
    router: Router | None = None,
    temperature: float = 0.0,
    eos_token_id: int | None = None,
    pad_token_id: int = 0,
    batch_size: int = 1,
    seed: int = 0,
) -> list[MixedGeneration]:
    """Decode ``prompts`` (token id lists) with the router-mix; ``alpha`` forces a fixed weight (GenARM)."""
    if (alpha is None) == (router is None):
        raise ValueError("pass exactly one of alpha (fixed mix) or router (TARo)")
    device = next(base.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 else None
    out: list[MixedGeneration] = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start : start + batch_size]
        out.extend(_generate_batch(base, reward, chunk, max_new_tokens, alpha, router, temperature,
                                   eos_token_id, pad_token_id, generator, device))
    return out


def _generate_batch(base, reward, prompts, max_new_tokens, alpha, router, temperature, eos, pad, generator, device):
    n = len(prompts)
    width = max(len(p) for p in prompts)
    ids = torch.full((n, width), pad, dtype=torch.long, device=device)
    attn = torch.zeros((n, width), dtype=torch.long, device=device)
    for i, p in enumerate(prompts):  # left padding keeps every row's last token at position -1
        ids[i, width - len(p):] = torch.tensor(p, device=device)
        attn[i, width - len(p):] = 1
    pos = (attn.cumsum(-1) - 1).clamp(min=0)
    results = [MixedGeneration([]) for _ in range(n)]
    done = torch.zeros(n, dtype=torch.bool, device=device)
    past_b = past_r = None
    step_ids, step_pos = ids, pos
    override = None if alpha is None else torch.full((n,), float(alpha), device=device)
    for _ in range(max_new_tokens):
        ob = base(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, past_key_values=past_b, use_cache=True)
        orw = reward(input_ids=step_ids, attention_mask=attn, position_ids=step_pos, past_key_values=past_r,
                     use_cache=True)
        past_b, past_r = ob.past_key_values, orw.past_key_values
        zb = ob.logits[:, -1, :]
        zr = orw.logits[:, -1, :]
        res = mix.route_and_mix(zb, zr, router=router, override=override, strict=True)
        tok = _pick(res.logits, temperature, generator)
        logp = torch.log_softmax(res.logits, dim=-1).gather(1, tok[:, None]).squeeze(1)
        for i in range(n):
            if not done[i]:
                results[i].token_ids.append(int(tok[i]))
                results[i].logprobs.append(float(logp[i]))
                results[i].alphas.append(float(res.alpha[i]))
        if eos is not None:
            done |= tok == eos
        if bool(done.all()):
            break
        step_ids = tok[:, None]
        step_pos = step_pos[:, -1:] + 1
        attn = torch.cat([attn, torch.ones((n, 1), dtype=attn.dtype, device=device)], dim=1)
    return results
