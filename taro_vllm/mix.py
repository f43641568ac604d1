"""The router-mix: ``(1 - a) * z_base + a * z_reward``, its router features, and the fused path used when serving.

Three layers, smallest first:

* :func:`mix_reference` - the formula, written plainly; tests compare everything else against it.
* :func:`topk_features` / :func:`full_logprobs` - what the routers read (shared by training and serving).
* :func:`fused_mix` - features, a_t, per-row overrides and the mixed logits in as few passes over the two ``[N, V]``
  tensors as the device allows: on CPU vectorised torch (one logsumexp + one blocked top-K per model, one mix), on CUDA the
  two-model logsumexp and the mix are Triton kernels (:mod:`taro_vllm.mix_triton`), with the torch path as fallback.

A token that either model masks with -inf is masked in the mix (for 0 < a < 1).

Non-finite logits (NaN or +inf in a row) are detected from the per-row logsumexp (or row max) that the mix computes
anyway, reported in ``MixResult.nonfinite`` and, with ``strict=True``, raised as :class:`NonFiniteLogitsError`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

if TYPE_CHECKING:  # import cycle: router imports this module for its features
    from taro_vllm.router import Router


class NonFiniteLogitsError(ValueError):
    """Raised when a row of base or reward logits holds NaN or +inf."""


@dataclass
class TopKFeatures:
    ids: torch.Tensor  # [N, S] int64 token ids of the selected slots
    logp_base: torch.Tensor  # [N, S] fp32 base log-probs at ids
    logp_reward: torch.Tensor  # [N, S] fp32 reward log-probs at ids
    lse_base: torch.Tensor  # [N] fp32 logsumexp of the base row
    lse_reward: torch.Tensor  # [N] fp32


@dataclass
class MixResult:
    logits: torch.Tensor  # [N, V] fp32 mixed logits
    alpha: torch.Tensor  # [N] fp32 weight actually used per row
    alpha_router: torch.Tensor | None  # [N] fp32 router output (None when no router ran)
    nonfinite: torch.Tensor  # [N] bool: row had NaN/+inf in base or reward logits


def align_vocab(z_reward: torch.Tensor, z_base: torch.Tensor) -> torch.Tensor:
    """Crop or pad reward logits to the base's vocabulary width.

    Models of one tokenizer may pad their embedding tables differently (Qwen2.5: 151936 vs 152064). Extra reward
    columns are dropped; missing ones are filled with the base's logits, so the mix there equals the base for any a
    (a finite fill keeps those columns usable at any a).
    """
    vb, vr = z_base.shape[-1], z_reward.shape[-1]
    if vr == vb:
        return z_reward
    if vr > vb:
        return z_reward[..., :vb]
    return torch.cat([z_reward, z_base[..., vr:].to(z_reward.dtype)], dim=-1)


def mix_reference(z_base: torch.Tensor, z_reward: torch.Tensor, alpha: torch.Tensor | float) -> torch.Tensor:
    """``(1 - a) * z_base + a * z_reward`` in fp32; a is a scalar or one weight per row."""
    zb, zr = z_base.float(), z_reward.float()
    a = torch.as_tensor(alpha, dtype=torch.float32, device=zb.device)
    if a.dim() == 1:
        a = a[:, None]
    return (1 - a) * zb + a * zr


def mix_rows(z_base: torch.Tensor, z_reward: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
    """The fused fp32 mix for one weight per row, vectorised (no loop over rows).

    Rows with a == 0 are copies of z_base and rows with a == 1 copies of z_reward, bit for bit, whatever the other
    model holds there; other rows are ``(1 - a) * z_base + a * z_reward``, so a token that either model masks with
    -inf stays masked (``torch.lerp`` would turn -inf into NaN).
    """
    a = alpha.float()[:, None]
    out = torch.mul(z_base, 1.0 - a)  # bf16 * fp32 promotes to fp32: the cast is fused into the product
    out.addcmul_(z_reward, a)
    exact0 = (alpha == 0).nonzero().flatten()
    exact1 = (alpha == 1).nonzero().flatten()
    if exact0.numel():
        out[exact0] = z_base[exact0].float()
    if exact1.numel():
        out[exact1] = z_reward[exact1].float()
    return out


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


def _rows_nonfinite(*row_stats: torch.Tensor) -> torch.Tensor:
    bad = torch.zeros_like(row_stats[0], dtype=torch.bool)
    for s in row_stats:
        # logsumexp / max of a row is NaN or +inf iff the row holds a NaN or +inf (all -inf rows are caught too).
        bad |= ~torch.isfinite(s)
    return bad


def fused_mix(
    z_base: torch.Tensor,
    z_reward: torch.Tensor,
    router: "Router | None" = None,
    override: torch.Tensor | None = None,
    *,
    strict: bool = False,
    needs_router: bool | None = None,
) -> MixResult:
    """Router features, a_t and the mixed logits for a batch of rows.

    ``override`` is a per-row fp32 vector: NaN means "use the router", a value in [0, 1] forces that weight (the
    GenARM fixed-a mix, 0 = base alone, 1 = reward alone). With ``router=None`` every row must be overridden.
    ``needs_router`` says whether any override is NaN when the caller already knows it (serving knows it on the
    host): the device is then never asked, so the call has no host-device sync.
    """
    z_reward = align_vocab(z_reward, z_base)
    n = z_base.shape[0]
    alpha_router = None
    row_stats: tuple[torch.Tensor, ...] | None = None
    known = needs_router is not None
    if not known:
        needs_router = override is None or bool(torch.isnan(override).any())
    needs_router = router is not None and (override is None or needs_router)
    if needs_router:
        from taro_vllm.router import TopKRouter

        if isinstance(router, TopKRouter):
            feats = topk_features(z_base, z_reward, router.cfg.k, router.cfg.source)
            alpha_router = router.forward_features(feats)
            row_stats = (feats.lse_base, feats.lse_reward)
        else:
            lp_b, lp_r = full_logprobs(z_base, z_reward)
            alpha_router = router.forward_logprobs(lp_b, lp_r)
            # log_softmax's row sums are not returned; the mixed-row max check below catches NaN/+inf instead.
        alpha = alpha_router if override is None else torch.where(torch.isnan(override), alpha_router, override)
    else:
        if override is None:
            raise ValueError("fused_mix needs a router or a per-row override weight")
        if not known and bool(torch.isnan(override).any()):
            raise ValueError("rows without an override weight need a router")
        alpha = override.float()
    alpha = alpha.to(device=z_base.device, dtype=torch.float32).reshape(n)
    from taro_vllm import mix_triton

    if mix_triton.available(z_base):
        mixed = mix_triton.mix_rows(z_base, z_reward, alpha)
    else:
        mixed = mix_rows(z_base, z_reward, alpha)
    if row_stats is None:
        row_stats = (mixed.amax(dim=-1),)  # NaN/+inf that reaches the mixed row (0 < a < 1, or the copied model)
    nonfinite = _rows_nonfinite(*row_stats)
    if strict and bool(nonfinite.any()):
        rows = nonfinite.nonzero().flatten().tolist()
        raise NonFiniteLogitsError(f"non-finite (NaN or +inf) base/reward logits in rows {rows}")
    return MixResult(mixed, alpha, alpha_router, nonfinite)
