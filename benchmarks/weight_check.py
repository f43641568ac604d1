"""Cost of the NaN/inf weight check (``taro_vllm.model_files.FiniteWeights``) on SmolLM2-135M's weight loading.

    python -m benchmarks.weight_check                 # SmolLM2-135M-Instruct, fp32, best of 10
    python -m benchmarks.weight_check --repeats 3

Loads the checkpoint the way TaroForCausalLM.load_weights sees it: vLLM's own safetensors iterator, each tensor
copied into a preallocated parameter of the same shape (the weight loaders' work), with and without the check
(one reduction per tensor, one sync at the end). Runs alternate, best of N each; the page cache is warm after the
first run, so "load" is the in-memory part of loading (a cold disk read only makes the check's share smaller).
"check alone" is the check over the same tensors already in memory: its floor, less sensitive to other work on the
machine (the 1-minute load average is recorded: on shared cores the differences are noisy).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch

from taro_vllm import assets
from taro_vllm.model_files import FiniteWeights, check_weights


def load(files: list[str], params: dict[str, torch.Tensor], check: bool) -> float:
    from vllm.model_executor.model_loader.weight_utils import safetensors_weights_iterator

    finite = FiniteWeights() if check else None
    t = time.perf_counter()
    for name, tensor in safetensors_weights_iterator(files, use_tqdm_on_load=False):
        if finite is not None:
            finite.add(name, tensor)
        params[name].copy_(tensor)
    if finite is not None:
        assert finite.flagged() == []
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "weight_check.json")
    args = ap.parse_args(argv)

    model = assets.build_smollm2()
    sources = check_weights(model)
    files = sorted({str(p) for p in sources.values()})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    from safetensors import safe_open

    params: dict[str, torch.Tensor] = {}
    for f in files:
        with safe_open(f, framework="pt") as sf:
            for name in sf.keys():
                sl = sf.get_slice(name)
                params[name] = torch.empty(sl.get_shape(), dtype=torch.float32, device=device)
    n = sum(p.numel() for p in params.values())

    def check_alone() -> float:
        t = time.perf_counter()
        finite = FiniteWeights()
        for name, p in params.items():
            finite.add(name, p)
        assert finite.flagged() == []
        return time.perf_counter() - t

    load(files, params, check=False)  # warm the page cache
    plain, checked, alone = [], [], []
    for _ in range(args.repeats):
        plain.append(load(files, params, check=False))
        checked.append(load(files, params, check=True))
        alone.append(check_alone())
    res = {"model": str(model), "device": str(device), "tensors": len(params), "params": n,
           "load_s": min(plain), "load_with_check_s": min(checked), "check_alone_s": min(alone),
           "load_median_s": statistics.median(plain), "load_with_check_median_s": statistics.median(checked),
           "check_ms": 1000 * (min(checked) - min(plain)),
           "overhead_pct": 100 * (min(checked) - min(plain)) / min(plain),
           "loadavg_1min": os.getloadavg()[0], "cpus": os.cpu_count(),
           "torch": torch.__version__, "date": time.strftime("%Y-%m-%d")}
    print(f"SmolLM2-135M ({n / 1e6:.1f} M params, {len(params)} tensors, fp32, {device}), best of {args.repeats}: "
          f"load {res['load_s'] * 1000:.0f} ms, with the NaN/inf check {res['load_with_check_s'] * 1000:.0f} ms "
          f"(+{res['check_ms']:.0f} ms, {res['overhead_pct']:+.1f}%); the check alone {res['check_alone_s'] * 1000:.0f}"
          f" ms; medians {res['load_median_s'] * 1000:.0f} / {res['load_with_check_median_s'] * 1000:.0f} ms; "
          f"load average {res['loadavg_1min']:.1f} on {res['cpus']} CPUs")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    return res


if __name__ == "__main__":
    main()
