"""Triton kernels for the mix on CUDA: the two-model row logsumexp in one pass, and the fp32 mix.

Used by :mod:`taro_vllm.mix` and :mod:`taro_vllm.features` only for CUDA tensors when Triton imports; everything has
a torch fallback. The kernels also run on CPU tensors under ``TRITON_INTERPRET=1``, which is how the test suite checks
them on a machine without a GPU (not yet measured on a GPU: see README).
"""

from __future__ import annotations

import torch

from taro_vllm import envs

try:  # Triton is optional: absent on CPU-only installs.
    import triton
    import triton.language as tl

    HAS_TRITON = True
except Exception:  # pragma: no cover - depends on the environment
    HAS_TRITON = False


# Decided once, at import (as vLLM's sampler picks its top-k/top-p backend once): Triton importable and not turned off
# with TARO_DISABLE_TRITON=1. Per call only the tensor's device is left to check.
ENABLED = HAS_TRITON and not envs.triton_disabled()


def available(t: torch.Tensor) -> bool:
    """Whether the kernels serve this tensor: Triton enabled and a CUDA tensor."""
    return ENABLED and t.is_cuda


if HAS_TRITON:

    @triton.jit
    def _row_index():
        # int64: program ids are int32 and strides below 2**31 are specialised as int32, so ``row * stride`` in
        # int32 overflows once rows * V >= 2**31 (14,134 rows at V = 151,936).
        return tl.program_id(0).to(tl.int64)

    @triton.jit
    def _mix_rows_kernel(zb_ptr, zr_ptr, a_ptr, out_ptr, V, stride_b, stride_r, stride_o, BLOCK: tl.constexpr):
        row = _row_index()
        offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        mask = offs < V
        a = tl.load(a_ptr + row)
        zb = tl.load(zb_ptr + row * stride_b + offs, mask=mask, other=0.0).to(tl.float32)
        zr = tl.load(zr_ptr + row * stride_r + offs, mask=mask, other=0.0).to(tl.float32)
        # Same semantics as mix.mix_rows: exact copies at a=0 / a=1, -inf in either model stays -inf in between.
        out = tl.where(a == 0.0, zb, tl.where(a == 1.0, zr, (1.0 - a) * zb + a * zr))
        tl.store(out_ptr + row * stride_o + offs, out, mask=mask)

    @triton.jit
    def _lse_pair_kernel(zb_ptr, zr_ptr, lse_b_ptr, lse_r_ptr, V, stride_b, stride_r, BLOCK: tl.constexpr):
        # One read of each row, online (max, sum-exp) per model: the flash-attention softmax recurrence.
        row = _row_index()
        m_b = tl.full((), float("-inf"), tl.float32)
        m_r = tl.full((), float("-inf"), tl.float32)
        s_b = tl.zeros((), tl.float32)
        s_r = tl.zeros((), tl.float32)
        for start in range(0, V, BLOCK):
            offs = start + tl.arange(0, BLOCK)
            mask = offs < V
            xb = tl.load(zb_ptr + row * stride_b + offs, mask=mask, other=float("-inf")).to(tl.float32)
            xr = tl.load(zr_ptr + row * stride_r + offs, mask=mask, other=float("-inf")).to(tl.float32)
            nb = tl.maximum(m_b, tl.max(xb, 0))
            nr = tl.maximum(m_r, tl.max(xr, 0))
            # Guard the all -inf prefix: while the running max is -inf, exp(-inf - -inf) would be NaN, both in the
            # rescale factor and in the block's own terms. A -inf entry adds exactly 0, so it is skipped rather than
            # computed (NaN still propagates). An all -inf row ends with m = -inf, s = 0: lse = -inf, as in torch.
            sb_scale = tl.where(nb == float("-inf"), 0.0, tl.exp(m_b - nb))
            sr_scale = tl.where(nr == float("-inf"), 0.0, tl.exp(m_r - nr))
            s_b = s_b * sb_scale + tl.sum(tl.where(mask & (xb != float("-inf")), tl.exp(xb - nb), 0.0), 0)
            s_r = s_r * sr_scale + tl.sum(tl.where(mask & (xr != float("-inf")), tl.exp(xr - nr), 0.0), 0)
            m_b = nb
            m_r = nr
        tl.store(lse_b_ptr + row, m_b + tl.log(s_b))
        tl.store(lse_r_ptr + row, m_r + tl.log(s_r))


def mix_rows(z_base: torch.Tensor, z_reward: torch.Tensor, alpha: torch.Tensor, block: int = 1024) -> torch.Tensor:
    """fp32 mix of :func:`taro_vllm.mix.mix_rows`, reading each input once."""
    n, v = z_base.shape
    zb, zr = z_base.contiguous(), z_reward.contiguous()
    out = torch.empty((n, v), dtype=torch.float32, device=zb.device)
    a = alpha.float().contiguous()
    _mix_rows_kernel[(n, triton.cdiv(v, block))](zb, zr, a, out, v, zb.stride(0), zr.stride(0), out.stride(0), BLOCK=block)
    return out


def logsumexp_pair(z_base: torch.Tensor, z_reward: torch.Tensor, block: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Row logsumexp of both models in one kernel (one read of each tensor)."""
    n, v = z_base.shape
    zb, zr = z_base.contiguous(), z_reward.contiguous()
    lse_b = torch.empty(n, dtype=torch.float32, device=zb.device)
    lse_r = torch.empty(n, dtype=torch.float32, device=zb.device)
    _lse_pair_kernel[(n,)](zb, zr, lse_b, lse_r, v, zb.stride(0), zr.stride(0), BLOCK=block)
    return lse_b, lse_r
