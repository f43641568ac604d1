"""The router-mix: ``(1 - a) * z_base + a * z_reward`` per row, and :func:`route_and_mix`, the step serving runs.

Smallest first:

* :func:`mix_reference` - the formula, written plainly; tests compare everything else against it.
* :func:`mix_rows` - the same with one weight per row, vectorised torch (a = 0 / 1 rows copy a model bit for bit).
* :func:`route_and_mix` - resolve the weight of each row (a per-row override, else the router's
  :class:`~taro_vllm.features.RouterWeight`), then mix. On CPU everything is vectorised torch; on CUDA the mix (and the
  top-K router's two-model logsumexp) are Triton kernels (:mod:`taro_vllm.mix_triton`), torch as the fallback.

This module knows routers only through that one method, ``router.weight(z_base, z_reward)``; it imports nothing
from :mod:`taro_vllm.router`. What the routers read lives in :mod:`taro_vllm.features` and is re-exported here
(``mix.TopKFeatures``, ``mix.topk_features``, ... as training uses them).

A token that either model masks with -inf is masked in the mix (for 0 < a < 1).

Non-finite logits (NaN or +inf in a row) are detected from the per-row statistics the router computed anyway (its
logsumexps) or else from the mixed row's max, reported in ``MixResult.nonfinite`` and, with ``strict=True``, raised as
:class:`NonFiniteLogitsError`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from taro_vllm.features import (  # noqa: F401  (re-exported: training and tests read them as mix.*)
    RouterWeight,
    TopKFeatures,
    WeighsRows,
    full_logprobs,
    logsumexp_pair,
    topk_features,
    topk_ids,
)


class NonFiniteLogitsError(ValueError):
    """Raised when a row of base or reward logits holds NaN or +inf."""


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
    """The fp32 mix for one weight per row, vectorised (no loop over rows).

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


def _rows_nonfinite(*row_stats: torch.Tensor) -> torch.Tensor:
    bad = torch.zeros_like(row_stats[0], dtype=torch.bool)
    for s in row_stats:
        # logsumexp / max of a row is NaN or +inf iff the row holds a NaN or +inf (all -inf rows are caught too).
        bad |= ~torch.isfinite(s)
    return bad


def resolve_weight(
    z_base: torch.Tensor,
    z_reward: torch.Tensor,
    router: WeighsRows | None = None,
    override: torch.Tensor | None = None,
    *,
    needs_router: bool | None = None,
) -> tuple[torch.Tensor, RouterWeight | None]:
    """The weight of each row ([N] fp32 on z_base's device) and the router's answer (None when no router ran).

    ``override`` is a per-row fp32 vector: NaN means "use the router", a value in [0, 1] forces that weight (the
    GenARM fixed-a mix, 0 = base alone, 1 = reward alone). With ``router=None`` every row must be overridden.
    ``needs_router`` says whether any override is NaN when the caller already knows it (serving knows it on the
    host): the device is then never asked, so the call has no host-device sync.
    """
    n = z_base.shape[0]
    routed = None
    known = needs_router is not None
    if not known:
        needs_router = override is None or bool(torch.isnan(override).any())
    needs_router = router is not None and (override is None or needs_router)
    if needs_router:
        routed = router.weight(z_base, z_reward)
        alpha = routed.alpha if override is None else torch.where(torch.isnan(override), routed.alpha, override)
    else:
        if override is None:
            raise ValueError("route_and_mix needs a router or a per-row override weight")
        if not known and bool(torch.isnan(override).any()):
            raise ValueError("rows without an override weight need a router")
        alpha = override.float()
    return alpha.to(device=z_base.device, dtype=torch.float32).reshape(n), routed


def route_and_mix(
    z_base: torch.Tensor,
    z_reward: torch.Tensor,
    router: WeighsRows | None = None,
    override: torch.Tensor | None = None,
    *,
    strict: bool = False,
    needs_router: bool | None = None,
) -> MixResult:
    """Resolve the weight of each row (:func:`resolve_weight`), then mix: the mixed fp32 logits, the weight used per
    row, the router's own weight and a per-row ``nonfinite`` flag. Arguments as in :func:`resolve_weight`; the reward
    logits are first aligned to the base's vocabulary (:func:`align_vocab`).
    """
    from taro_vllm import mix_triton

    # Named ranges so a torch.profiler trace (benchmarks.profile_step) shows the router and the mix as stages.
    with torch.profiler.record_function("taro::router"):
        z_reward = align_vocab(z_reward, z_base)
        alpha, routed = resolve_weight(z_base, z_reward, router, override, needs_router=needs_router)
    with torch.profiler.record_function("taro::mix"):
        mixed = (mix_triton.mix_rows if mix_triton.available(z_base) else mix_rows)(z_base, z_reward, alpha)
    row_stats = routed.row_stats if routed is not None else ()
    if not row_stats:
        row_stats = (mixed.amax(dim=-1),)  # NaN/+inf that reaches the mixed row (0 < a < 1, or the copied model)
    nonfinite = _rows_nonfinite(*row_stats)
    if strict and bool(nonfinite.any()):
        rows = nonfinite.nonzero().flatten().tolist()
        raise NonFiniteLogitsError(f"non-finite (NaN or +inf) base/reward logits in rows {rows}")
    return MixResult(mixed, alpha, None if routed is None else routed.alpha, nonfinite)


fused_mix = route_and_mix  # the former name (the mix is fused only on CUDA)
