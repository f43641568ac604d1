"""Token ids, padded batches and loss masks for both trainers.

Prefix and continuation are tokenised separately and concatenated, so the scored tokens are exactly the step's (or
the solution's) tokens whatever the BPE would merge across the boundary. The prompt is wrapped in the tokenizer's
chat template when it has one: the served models are chat models and the router should see the prompt format it
will be served with. A record's ``dataset`` picks the message list (:data:`PROMPT_FORMATS`: TAWP's system line +
worked example, the same one sampling and evaluation use); anything else is one user turn.

Contexts are never cut at the front: a step without the start of its question (or the chat header) teaches the
reward model a different task. Chosen and rejected share one context, token for token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from router_training import tawp
from router_training.configs import arg
from router_training.data import Solution, StepPair
from router_training.errors import DataError

PROMPT_FORMATS = {"tawp": tawp.messages}


@dataclass
class Batch:
    input_ids: torch.Tensor  # [B, T] right-padded
    attention_mask: torch.Tensor  # [B, T]
    target_mask: torch.Tensor  # [B, T] True where the token is scored (predicted from position t-1)

    def to(self, device: torch.device | str) -> "Batch":
        return Batch(self.input_ids.to(device), self.attention_mask.to(device), self.target_mask.to(device))


@dataclass
class ExampleConfig:
    """How both trainers turn their records into examples: the token window, the prompt format and the held-out
    split (``data.split_by_group``, by problem)."""

    max_len: int = arg(256, "tokens per sequence (prompt + the scored steps or solution)")
    heldout_fraction: float = arg(0.1, "problems held out for evaluation")
    chat_template: bool = arg(True, "wrap prompts in the tokenizer's chat template")

    def encoder(self, tokenizer) -> Encoder:
        return Encoder(tokenizer, self.max_len, self.chat_template)


class Encoder:
    def __init__(self, tokenizer, max_len: int = 256, chat_template: bool = True):
        self.tok = tokenizer
        self.max_len = max_len
        self.chat = chat_template and bool(getattr(tokenizer, "chat_template", None))
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (tokenizer.eos_token_id or 0)

    def _ids(self, text: str) -> list[int]:
        return self.tok(text, add_special_tokens=False)["input_ids"] if text else []

    def messages(self, prompt: str, dataset: str = "") -> list[dict[str, str]]:
        fmt = PROMPT_FORMATS.get(dataset)
        return fmt(prompt) if fmt else [{"role": "user", "content": prompt}]

    def prompt_ids(self, prompt: str, dataset: str = "") -> list[int]:
        if self.chat:
            out = self.tok.apply_chat_template(self.messages(prompt, dataset), tokenize=True,
                                               add_generation_prompt=True)
            ids = out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out
            return list(ids)
        return self._ids("\n".join(m["content"] for m in self.messages(prompt, dataset)) + "\n")

    def _check_context(self, ctx: list[int], what: str) -> None:
        if len(ctx) >= self.max_len:
            raise DataError(f"{what}: its context is {len(ctx)} tokens, the window (--max-len) {self.max_len}; "
                            f"raise --max-len (contexts are never cut at the front)")

    def pair(self, p: StepPair) -> tuple[list[int], list[int], list[int], list[int]]:
        """(context, chosen ids, context, rejected ids): ONE context for both sides, whole; only the steps' tails
        are cut if the window is too small."""
        ctx = self.prompt_ids(p.prompt, p.dataset) + self._ids(p.initial_reason_steps)
        self._check_context(ctx, f"pair {p.id!r}")
        room = self.max_len - len(ctx)
        return ctx, self._ids(p.chosen)[:room], ctx, self._ids(p.rejected)[:room]

    def solution(self, s: Solution) -> tuple[list[int], list[int]]:
        """(prompt ids, solution ids + eos); the prompt is kept whole, the solution's tail cut at the window."""
        prompt = self.prompt_ids(s.prompt, s.dataset)
        self._check_context(prompt, f"solution {s.id!r}")
        sol = self._ids(s.solution)
        eos = self.tok.eos_token_id
        if eos is not None:
            sol = sol + [eos]  # the router must also learn when to stop
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
