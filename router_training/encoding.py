"""Token ids, padded batches and loss masks for both trainers.

Prefix and continuation are tokenised separately and concatenated, so the scored tokens are exactly the step's (or
the solution's) tokens whatever the BPE would merge across the boundary. The prompt is wrapped in the tokenizer's
chat template (one user turn + the assistant header) when it has one: the served models are chat models and the
router should see the prompt format it will be served with.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from router_training.data import Solution, StepPair


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T] True where the token is scored (predicted from position t-1)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))


class Encoder:
    def __init__(self, tokenizer, max_len: int = 256, chat_template: bool = True):
        self.tok = tokenizer
        self.max_len = max_len
        self.chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def prompt_ids(self, prompt: str) -> list[int]:
        if self.chat:
            out = self.tok.apply_chat_template([{"role": "user", "content": prompt}], tokenize=True,
                                               add_generation_prompt=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(ids)
        return self._ids(prompt + "\n")

    def _fit(self, context: list[int], scored: list[int]) -> tuple[list[int], list[int]]:
        # Keep the scored tokens (at most half the window) and the most recent context: the next step depends
        # most on the steps just before it.
        scored = scored[: max(1, self.max_len // 2)] if len(context) + len(scored) > self.max_len else scored
        room = self.max_len - len(scored)
        return (context[-room:] if room > 0 else []), scored

    def pair(self, p: StepPair) -> tuple[list[int], list[int], list[int], list[int]]:
        """(context_c, chosen ids, context_r, rejected ids), each context fitted to the window."""
        ctx = self.prompt_ids(p.prompt) + self._ids(p.initial_reason_steps)
        cc, c = self._fit(ctx, self._ids(p.chosen))
        cr, r = self._fit(ctx, self._ids(p.rejected))
        return cc, c, cr, r

    def solution(self, s: Solution) -> tuple[list[int], list[int]]:
        """(prompt ids, solution ids + eos); the solution is cut at the window, the prompt kept whole if it fits."""
        prompt = self.prompt_ids(s.prompt)
        sol = self._ids(s.solution)
        eos = self.tok.eos_token_id
        if eos is not None:
            sol = sol + [eos]  # the router must also learn when to stop
        prompt = prompt[-(self.max_len - 1):]
        return prompt, sol[: self.max_len - len(prompt)]


def collate(parts: Sequence[tuple[list[int], list[int]]], pad_id: int) -> Batch:
    """(context, scored) pairs -> a right-padded batch; target_mask marks the scored tokens."""
    width = max(len(c) + len(s) for c, s in parts)
    n = len(parts)
    ids = torch.full((n, width), pad_id, dtype=torch.long)
    attn = torch.zeros((n, width), dtype=torch.long)
    tgt = torch.zeros((n, width), dtype=torch.bool)
    for i, (c, s) in enumerate(parts):
        seq = c + s
        ids[i, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        attn[i, : len(seq)] = 1
        tgt[i, len(c): len(seq)] = True
    # Position 0 has no predecessor: it can never be scored.
    tgt[:, 0] = False
    return Batch(ids, attn, tgt)


def scored_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log p(targets) from aligned logits ([B, K, V] predicting [B, K]), fp32, zero where ``mask`` is False.

    The log-softmax runs on the scored rows only ([N, V]), not on every position.
    """
    z = logits[mask].float()
    lp = z.gather(1, targets[mask][:, None]).squeeze(1) - torch.logsumexp(z, dim=-1)
    return torch.zeros(mask.shape, dtype=lp.dtype, device=lp.device).masked_scatter(mask, lp)


def batch_indices(n: int, batch_size: int, step: int, seed: int) -> list[int]:
    """The examples of training step ``step``: epochs of seeded permutations, a pure function of (n, step, seed).

    No sampler state to save: a resumed run draws the same batches as an uninterrupted one.
    """
    out = []
    for g in range(step * batch_size, (step + 1) * batch_size):
        epoch, pos = divmod(g, n)
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        out.append(int(torch.randperm(n, generator=gen)[pos]))
    return out
