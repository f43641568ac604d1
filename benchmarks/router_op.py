"""Micro-benchmark of the router-mix op alone: reference vs fused, top-K vs full-logits router.

    python -m benchmarks.router_op                          # vocab 49k/128k/152k x batch 1..256, fp32
    python -m benchmarks.router_op --vocab 49152 --batch 1 32 --repeats 3    # quick

Needs only torch (Triton on CUDA): runs on a GPU when one is present, else on CPU. "reference" = router on the
inputs, then the plain formula ``(1 - a) z_b + a z_r``; "fused" = ``taro_vllm.mix.route_and_mix`` (features, a_t and the
mix in as few passes as the device allows). GB/s counts the bytes that must at least be touched: both ``[N, V]``
inputs read once and the fp32 output written once.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from taro_vllm import mix
from taro_vllm.router import RouterConfig, build_router


def _time(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (Triton compile, allocator)
    if device.type == "cuda":
        torch.cuda.synchronize()
    best = float("inf")
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - t)
    return best


def bench(vocab: int, batch: int, kind: str, device: torch.device, dtype: torch.dtype, repeats: int) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    zb = (torch.randn(batch, vocab, generator=g) * 4).to(device=device, dtype=dtype)
    zr = (torch.randn(batch, vocab, generator=g) * 4).to(device=device, dtype=dtype)
    router = build_router(RouterConfig(kind=kind, vocab_size=vocab)).to(device).eval()

    def reference():
        with torch.inference_mode():
            return mix.mix_reference(zb, zr, router(zb, zr))

    def fused():
        with torch.inference_mode():
            return mix.route_and_mix(zb, zr, router=router).logits

    fixed_a = torch.full((batch,), 0.5, device=device)

    def mix_only():  # the GenARM fixed-a path: what the router adds on top of it is fused - mix_only
        with torch.inference_mode():
            return mix.route_and_mix(zb, zr, override=fixed_a).logits

    bytes_min = 2 * batch * vocab * zb.element_size() + batch * vocab * 4
    t_ref, t_fused = _time(reference, device, repeats), _time(fused, device, repeats)
    t_mix = _time(mix_only, device, repeats)
    return {"vocab": vocab, "batch": batch, "router": kind, "device": device.type, "dtype": str(dtype),
            "reference_ms": 1e3 * t_ref, "fused_ms": 1e3 * t_fused, "mix_only_ms": 1e3 * t_mix,
            "router_cost_ms": 1e3 * (t_fused - t_mix),
            "fused_GBps": bytes_min / t_fused / 1e9, "reference_GBps": bytes_min / t_ref / 1e9}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256, 151936])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    p.add_argument("--kinds", nargs="+", default=["topk", "full"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    rows = []
    for v in args.vocab:
        for b in args.batch:
            for kind in args.kinds:
                rows.append(bench(v, b, kind, device, dtype, args.repeats))
                r = rows[-1]
                print(f"V={v:>6} N={b:>3} {kind:>4}: reference {r['reference_ms']:8.2f} ms  fused "
                      f"{r['fused_ms']:8.2f} ms  ({r['fused_GBps']:.2f} GB/s)  fixed-a mix "
                      f"{r['mix_only_ms']:8.2f} ms", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "router_op.json").write_text(json.dumps(rows, indent=2) + "\n")
    lines = [f"device: {device.type}, dtype {args.dtype}, best of {args.repeats}", "",
             "| vocab | batch | router | reference (ms) | fused (ms) | fused GB/s | fixed-a mix (ms) | router cost (ms) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['vocab']} | {r['batch']} | {r['router']} | {r['reference_ms']:.2f} | {r['fused_ms']:.2f} | "
              f"{r['fused_GBps']:.2f} | {r['mix_only_ms']:.2f} | {r['router_cost_ms']:.2f} |" for r in rows]
    (args.out / "router_op.md").write_text("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
