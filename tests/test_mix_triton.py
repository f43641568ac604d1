"""The Triton kernels, run on CPU tensors by Triton's interpreter (no GPU here); the CUDA path is the same code."""

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("triton")

SCRIPT = textwrap.dedent(
    """
    import torch
    from taro_vllm import mix, mix_triton

    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        zb = (torch.randn(5, 3000, generator=g) * 6).to(dtype)
        zr = (torch.randn(5, 3000, generator=g) * 6).to(dtype)
        zb[1, :7] = float("-inf")
        a = torch.tensor([0.0, 0.3, 0.5, 0.9, 1.0])
        out = mix_triton.mix_rows(zb, zr, a, block=512)
        ref = mix.mix_rows(zb, zr, a)
        assert torch.equal(out[0], zb[0].float()) and torch.equal(out[4], zr[4].float())
        assert torch.equal(torch.isneginf(out), torch.isneginf(ref))
        fin = torch.isfinite(ref)
        err = (out[fin] - ref[fin]).abs().max().item()
        assert err <= 1e-5, err
        lb, lr = mix_triton.logsumexp_pair(zb, zr, block=512)
        err_lse = max((lb - torch.logsumexp(zb.float(), -1)).abs().max().item(),
                      (lr - torch.logsumexp(zr.float(), -1)).abs().max().item())
        assert err_lse <= 1e-4, err_lse
        print(dtype, "mix max err", err, "lse max err", err_lse)
    zr[2, 5] = float("nan")
    lb, lr = mix_triton.logsumexp_pair(zb, zr)
    assert torch.isnan(lr[2]) and torch.isfinite(lr[[0, 1, 3, 4]]).all()
    print("ok")
    """
)


def test_triton_kernels_match_torch_under_the_interpreter():
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("ok")
