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


def run_interpreted(script: str) -> str:
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(script)], env=env, capture_output=True, text=True,
                         timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout


def test_logsumexp_of_a_row_whose_leading_blocks_are_all_masked():
    """A row whose first block (or two) is entirely -inf has a finite logsumexp, as in torch; an all -inf row's is
    -inf. (A grammar or a vocabulary mask can hide the first 1024 ids; the online recurrence used to give NaN.)"""
    stdout = run_interpreted(
        """
        import torch
        from taro_vllm import mix_triton

        g = torch.Generator().manual_seed(1)
        zb = torch.randn(4, 5000, generator=g) * 4
        zr = torch.randn(4, 5000, generator=g) * 4
        zb[0, :1024] = float("-inf")          # exactly the first block (block = 1024, the default)
        zr[1, :2500] = float("-inf")          # the first two blocks and part of the third
        zb[2] = float("-inf")                 # the whole row
        zr[3, 1:] = float("-inf")             # one live entry, in the first block
        lb, lr = mix_triton.logsumexp_pair(zb, zr)
        tb, tr = torch.logsumexp(zb, -1), torch.logsumexp(zr, -1)
        print("triton", lb.tolist(), lr.tolist())
        print("torch ", tb.tolist(), tr.tolist())
        assert not torch.isnan(lb).any() and not torch.isnan(lr).any()
        assert lb[2] == float("-inf")
        fin = torch.isfinite(tb)
        assert (lb[fin] - tb[fin]).abs().max() <= 1e-4 and (lr - tr).abs().max() <= 1e-4
        print("ok")
        """
    )
    assert stdout.strip().endswith("ok")


def test_row_offsets_are_int64():
    """Row offsets (row * stride) are computed in int64: in int32 they wrap once rows x vocab >= 2**31. Checked on
    the offset helper both kernels use, with a stride of 2**30 (no 8 GB tensor needed)."""
    stdout = run_interpreted(
        """
        import inspect
        import torch
        import triton
        import triton.language as tl
        from taro_vllm import mix_triton

        @triton.jit
        def probe(out_ptr, stride):
            row = mix_triton._row_index()
            tl.store(out_ptr + row, row * stride)

        stride = 2**30 + 3
        out = torch.zeros(4, dtype=torch.int64)
        probe[(4,)](out, stride)
        print(out.tolist())
        assert out.tolist() == [r * stride for r in range(4)], out.tolist()
        for k in (mix_triton._mix_rows_kernel, mix_triton._lse_pair_kernel):
            src = inspect.getsource(k.fn)
            assert "row = _row_index()" in src and "tl.program_id(0)" not in src, src
        print("ok")
        """
    )
    assert stdout.strip().endswith("ok")
