"""What the routers read from the two logit tensors, and what a router hands back to the mix.

The bottom of the routing stack: :mod:`taro_vllm.router` builds its inputs from here, :mod:`taro_vllm.mix` reads a
router's :class:`RouterWeight`, and neither of those two imports the other. Training (``router_training``) reads the
same features (through ``taro_vllm.mix``, which re-exports them), so serving and training share them bit for bit.

* :func:`topk_features` - the top-K token ids of the base, the reward or both, and both models' log-probs there.
* :func:`full_logprobs` - both full log-prob rows (the full-logits router).
* :class:`RouterWeight` - a router's a_t per row plus the per-row statistics it computed on the way (the top-K
  router's two logsumexps), which the mix reuses to flag rows holding NaN/+inf without another pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

import torch


@dataclass
class TopKFeatures:
    ids: torch.Tensor  # [N, S] int64 token ids of the selected slots
    logp_base: torch.Tensor  # [N, S] fp32 base log-probs at ids
    logp_reward: torch.Tensor  # [N, S] fp32 reward log-probs at ids
    lse_base: torch.Tensor  # [N] fp32 logsumexp of the base row
    lse_reward: torch.Tensor  # [N] fp32


@dataclass
class RouterWeight:
    """A router's answer for a batch of rows."""

    alpha: torch.Tensor  # [N] fp32 a_t in (0, 1)
    # [N] tensors computed on the way whose entry is NaN or +inf iff that row of z_base or z_reward holds a NaN or
    # +inf (row logsumexps); empty when the router computed none (the mix then checks the mixed row instead).
    row_stats: tuple[torch.Tensor, ...] = ()


class WeighsRows(Protocol):
    """The one interface the mix needs from a router (both :mod:`taro_vllm.router` classes implement it)."""

    def weight(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> RouterWeight: ...


_TOPK_BLOCK = 64


def topk_ids(z: torch.Tensor, k: int) -> torch.Tensor:
    """Ids of the k largest entries of each row, largest first; the same set as ``torch.topk``, faster on CPU.

    torch.topk over a 49k-152k vocabulary runs at a few GB/s on CPU, slower than the mix itself. The k largest
    entries of a row always lie in the k blocks (of 64) with the largest block maxima: a block outside those has k
    larger entries elsewhere. So one max-reduction (memory speed) narrows the search to k * 64 candidates. Only the
    order of exactly tied entries may differ from torch.topk. CUDA keeps torch.topk, which is fast there.
    """
    n, v = z.shape
    nblk = v // _TOPK_BLOCK
    if z.is_cuda or nblk < 4 * k:
        return torch.topk(z, k, dim=-1, sorted=True).indices
    blocks = z.unfold(1, _TOPK_BLOCK, _TOPK_BLOCK)  # [n, nblk, 64] view; a tail of v % 64 entries is left out
    best = torch.topk(blocks.amax(dim=-1), k, dim=-1, sorted=False).indices  # [n, k]
    cand = torch.gather(blocks, 1, best[..., None].expand(-1, -1, _TOPK_BLOCK)).reshape(n, k * _TOPK_BLOCK)
    offs = torch.arange(_TOPK_BLOCK, device=z.device)
    cand_ids = (best[..., None] * _TOPK_BLOCK + offs).reshape(n, k * _TOPK_BLOCK)
    tail = v - nblk * _TOPK_BLOCK
    if tail:
        cand = torch.cat([cand, z[:, nblk * _TOPK_BLOCK:]], dim=-1)
        tail_ids = torch.arange(nblk * _TOPK_BLOCK, v, device=z.device).expand(n, tail)
        cand_ids = torch.cat([cand_ids, tail_ids], dim=-1)
    return torch.gather(cand_ids, 1, torch.topk(cand, k, dim=-1, sorted=True).indices)


def _select_ids(z_base: torch.Tensor, z_reward: torch.Tensor, k: int, source: str) -> torch.Tensor:
    k = min(k, z_base.shape[-1])
    if source == "base":
        return topk_ids(z_base, k)
    if source == "reward":
        return topk_ids(z_reward, k)
    # both: the 2K ids may overlap; duplicates are harmless (the MLP just sees the same token twice).
    return torch.cat([topk_ids(z_base, k), topk_ids(z_reward, k)], dim=-1)


def topk_features(
    z_base: torch.Tensor, z_reward: torch.Tensor, k: int, source: Literal["base", "reward", "both"] = "both"
) -> TopKFeatures:
    """Top-K token ids and both models' log-probs at those ids.

    Slots are ordered by the selecting model's rank (base's K, then reward's K for ``both``).
    """
    ids = _select_ids(z_base, z_reward, k, source)
    lse_b, lse_r = logsumexp_pair(z_base, z_reward)
    lp_b = torch.gather(z_base, 1, ids).float() - lse_b[:, None]
    lp_r = torch.gather(z_reward, 1, ids).float() - lse_r[:, None]
    return TopKFeatures(ids, lp_b, lp_r, lse_b, lse_r)


def logsumexp_pair(z_base: torch.Tensor, z_reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logsumexp of both models (fp32); one Triton kernel on CUDA."""
    from taro_vllm import mix_triton

    if mix_triton.available(z_base):
        return mix_triton.logsumexp_pair(z_base, z_reward)
    return torch.logsumexp(z_base.float(), dim=-1), torch.logsumexp(z_reward.float(), dim=-1)


def full_logprobs(z_base: torch.Tensor, z_reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.log_softmax(z_base.float(), dim=-1), torch.log_softmax(z_reward.float(), dim=-1)
