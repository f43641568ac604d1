"""What the routers read from the two logit tensors, and what a router hands back to the mix.

The bottom of the routing stack: :mod:`taro_vllm.router` builds its inputs from here, :mod:`taro_vllm.mix` reads a
router's :class:`RouterWeight`, and neither of those two imports the other. Training (``router_training``) reads the
same features (through ``taro_vllm.mix``, which re-exports them), so serving and training share them bit for bit.

* :func:`topk_features` - the top-K token ids of the base, the reward or both, and both models' log-probs there.
* :func:`row_stats` - on CPU, the row logsumexp and 64-wide block maxima of both models in one chunked pass.
* :func:`full_logprobs` - both full log-prob rows (the full-logits router).
* :class:`RouterWeight` - a router's a_t per row plus the per-row statistics it computed on the way (the top-K
  router's two logsumexps), which the mix reuses to flag rows holding NaN/+inf without another pass.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
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
_LOG2E = torch.tensor(math.log2(math.e), dtype=torch.float32).item()  # log2(e) as the fp32 the kernels apply
_CHUNK_ELEMS = 1 << 20  # rows per chunk on CPU: about 4 MB of fp32 logits per model, so the chunk stays in cache
# ... but at most this many chunks: every op on a chunk is a parallel region ending in a barrier, and on shared cores a
# descheduled thread stalls each barrier; 16 chunks of up to ~10 MB per model (N = 256, V = 152k) cost ~4% more than
# 4 MB chunks on an idle core, and cut the barriers to about a third.
_MAX_CHUNKS = 16


@dataclass
class RowStats:
    """One model's per-row statistics from :func:`row_stats`."""

    block_max: torch.Tensor  # [N, V // 64] fp32 max of each whole block of 64 logits (a tail of V % 64 left out)
    lse: torch.Tensor  # [N] fp32 row logsumexp


def row_stats(zs: Sequence[torch.Tensor]) -> list[RowStats]:
    """Block maxima and logsumexp of every row of each ``[N, V]`` tensor (CPU; fp32 or bf16 in, fp32 out).

    Why: ``torch.logsumexp`` on CPU writes and re-reads ``[N, V]`` fp32 temporaries (each a pass through memory and
    fresh pages to fault in), and so did a ``.float()`` copy of bf16 logits. Here rows go in chunks of a few MB per
    model, all models of a chunk before the next chunk, and every pass after the first reads the chunk from cache:

    1. the block maxima (one read of the logits; their max is the row max ``m``, the blocked top-K reads them);
    2. ``exp2(z * log2(e) - m * log2(e))`` into a preallocated fp32 scratch, in place, summed per row.

    exp2 is used because torch's vectorised ``exp2`` costs half of ``exp`` on CPU; the multiply by log2(e) is fused
    into the subtraction of the max. The max's rounded product is the same in every term and is added back exactly
    (in fp64, per row), so the result is the row logsumexp within fp32 rounding. As ``torch.logsumexp``, a row holding
    NaN gives NaN, a row holding +inf gives +inf, an all -inf row gives -inf, and -inf entries count as 0.
    bf16 logits are first widened into the scratch (the reductions on bf16 are several times slower than on fp32).
    """
    n, v = zs[0].shape
    nblk = v // _TOPK_BLOCK
    rows = max(1, _CHUNK_ELEMS // v, -(-n // _MAX_CHUNKS))
    scratch = torch.empty(min(rows, n), v, dtype=torch.float32, device=zs[0].device)
    block_max = [torch.empty(n, nblk, dtype=torch.float32, device=z.device) for z in zs]
    neg_max2 = torch.empty(len(zs), n, dtype=torch.float32, device=zs[0].device)  # -m * log2(e), +-inf -> 0
    sums = torch.empty(len(zs), n, dtype=torch.float32, device=zs[0].device)
    for i in range(0, n, rows):
        j = min(i + rows, n)
        sc = scratch[: j - i]
        for z, bmax, nm2, s in zip(zs, block_max, neg_max2, sums):
            _chunk_stats(z[i:j], sc, bmax[i:j], nm2[i:j], s[i:j])
    # sum_j 2^(z_j log2(e) + nm2) = s  =>  lse = (log2(s) - nm2) / log2(e), in fp64 per row.
    lse = ((sums.double().log2() - neg_max2.double()) / _LOG2E).float()
    return [RowStats(bmax, row_lse) for bmax, row_lse in zip(block_max, lse)]


def _chunk_stats(z: torch.Tensor, sc: torch.Tensor, bmax: torch.Tensor, nm2: torch.Tensor, s: torch.Tensor) -> None:
    """:func:`row_stats` of one chunk of rows of one model, into ``bmax``, ``nm2`` and ``s`` (views of the result)."""
    nblk = bmax.shape[1]
    src = z if z.dtype == torch.float32 else sc.copy_(z)
    if nblk:
        torch.amax(src.unfold(1, _TOPK_BLOCK, _TOPK_BLOCK), dim=-1, out=bmax)  # unfold leaves out the tail
        m = bmax.amax(dim=-1)
        if src.shape[1] > nblk * _TOPK_BLOCK:
            m = torch.maximum(m, src[:, nblk * _TOPK_BLOCK:].amax(dim=-1))
    else:
        m = src.amax(dim=-1)
    # Rows whose max is +-inf shift by 0 (as torch.logsumexp): an all -inf row sums to 0, a +inf row to +inf.
    torch.nan_to_num(m.mul_(-_LOG2E), nan=math.nan, posinf=0.0, neginf=0.0, out=nm2)
    torch.add(nm2[:, None], src, alpha=_LOG2E, out=sc)
    torch.sum(sc.exp2_(), dim=-1, out=s)


def topk_ids(z: torch.Tensor, k: int, block_max: torch.Tensor | None = None) -> torch.Tensor:
    """Ids of the k largest entries of each row, largest first; the same set as ``torch.topk``, faster on CPU.

    torch.topk over a 49k-152k vocabulary runs at a few GB/s on CPU, slower than the mix itself. The k largest
    entries of a row always lie in the k blocks (of 64) with the largest block maxima: a block outside those has k
    larger entries elsewhere. So one max-reduction (memory speed) narrows the search to k * 64 candidates; pass
    ``block_max`` ([N, V // 64], as :func:`row_stats` returns it) when it is known already. Only the order of exactly
    tied entries may differ from torch.topk. CUDA keeps torch.topk, which is fast there.
    """
    n, v = z.shape
    nblk = v // _TOPK_BLOCK
    if z.is_cuda or nblk < 4 * k:
        return torch.topk(z, k, dim=-1, sorted=True).indices
    blocks = z.unfold(1, _TOPK_BLOCK, _TOPK_BLOCK)  # [n, nblk, 64] view; a tail of v % 64 entries is left out
    if block_max is None:
        block_max = blocks.amax(dim=-1)
    best = torch.topk(block_max, k, dim=-1, sorted=False).indices  # [n, k]
    cand = torch.gather(blocks, 1, best[..., None].expand(-1, -1, _TOPK_BLOCK)).reshape(n, k * _TOPK_BLOCK)
    offs = torch.arange(_TOPK_BLOCK, device=z.device)
    cand_ids = (best[..., None] * _TOPK_BLOCK + offs).reshape(n, k * _TOPK_BLOCK)
    tail = v - nblk * _TOPK_BLOCK
    if tail:
        cand = torch.cat([cand, z[:, nblk * _TOPK_BLOCK:]], dim=-1)
        tail_ids = torch.arange(nblk * _TOPK_BLOCK, v, device=z.device).expand(n, tail)
        cand_ids = torch.cat([cand_ids, tail_ids], dim=-1)
    return torch.gather(cand_ids, 1, torch.topk(cand, k, dim=-1, sorted=True).indices)


def _select_ids(z_base: torch.Tensor, z_reward: torch.Tensor, k: int, source: str,
                stats: Sequence[RowStats | None] = (None, None)) -> torch.Tensor:
    k = min(k, z_base.shape[-1])
    bmax_b, bmax_r = (None if st is None else st.block_max for st in stats)
    if source == "base":
        return topk_ids(z_base, k, bmax_b)
    if source == "reward":
        return topk_ids(z_reward, k, bmax_r)
    # both: the 2K ids may overlap; duplicates are harmless (the MLP just sees the same token twice).
    return torch.cat([topk_ids(z_base, k, bmax_b), topk_ids(z_reward, k, bmax_r)], dim=-1)


def topk_features(
    z_base: torch.Tensor, z_reward: torch.Tensor, k: int, source: Literal["base", "reward", "both"] = "both"
) -> TopKFeatures:
    """Top-K token ids and both models' log-probs at those ids.

    Slots are ordered by the selecting model's rank (base's K, then reward's K for ``both``); exactly tied logits
    may come in another order than ``torch.topk`` gives them (and, tied at the K-th place, be other ids of that value).
    On CPU both models' row statistics come from one chunked pass (:func:`row_stats`), whose block maxima also
    narrow the top-K search; elsewhere :func:`logsumexp_pair` (a Triton kernel on CUDA) and ``torch.topk``.
    """
    if z_base.device.type == "cpu":
        stats = row_stats((z_base, z_reward))
        ids = _select_ids(z_base, z_reward, k, source, stats)
        lse_b, lse_r = stats[0].lse, stats[1].lse
    else:
        ids = _select_ids(z_base, z_reward, k, source)
        lse_b, lse_r = logsumexp_pair(z_base, z_reward)
    lp_b = torch.gather(z_base, 1, ids).float() - lse_b[:, None]
    lp_r = torch.gather(z_reward, 1, ids).float() - lse_r[:, None]
    return TopKFeatures(ids, lp_b, lp_r, lse_b, lse_r)


def logsumexp_pair(z_base: torch.Tensor, z_reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logsumexp of both models (fp32); one Triton kernel on CUDA, one chunked pass on CPU (:func:`row_stats`)."""
    from taro_vllm import mix_triton

    if mix_triton.available(z_base):
        return mix_triton.logsumexp_pair(z_base, z_reward)
    if z_base.device.type == "cpu":
        stats = row_stats((z_base, z_reward))
        return stats[0].lse, stats[1].lse
    return torch.logsumexp(z_base.float(), dim=-1), torch.logsumexp(z_reward.float(), dim=-1)


def full_logprobs(z_base: torch.Tensor, z_reward: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.log_softmax(z_base.float(), dim=-1), torch.log_softmax(z_reward.float(), dim=-1)
