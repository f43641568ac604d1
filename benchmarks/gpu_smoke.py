"""GPU smoke test: what the CPU suite cannot settle, in one command on a machine with one CUDA GPU (~10 min).

    python -m benchmarks.gpu_smoke [--base DIR --reward DIR --router CKPT] [--keep-logs DIR]

Not run in CI (no GPU there). Defaults: the tiny Llama pair (random weights on SmolLM2's tokenizer, built offline by
``taro-vllm assets tiny``) and a random router, so any GPU with ~4 GB free works. Checks, in order, each printed as
PASS/FAIL with numbers; exit code 1 if any failed:

1. Triton kernels vs torch on CUDA tensors (fp32 and bf16, vocab 151,936): the mix, the two-model logsumexp,
   a fully masked leading block and an all -inf row (D4), a >2**31-element launch guard check (D5, only when the GPU
   has the memory).
2. Host-device syncs of one TARo decode step on CUDA (the CPU census of tests/test_v2_runner.py, with real
   cross-device copies counted): expect 0 untraced.
3. ``taro-vllm serve`` on the pair (Model Runner V2, the CUDA default; compiled, CUDA graphs on): starts; greedy
   ``taro_mode=base`` / ``reward`` give the text and the logprobs of plain vLLM serving the base / reward alone;
   a fixed a = 0.5 request with a ``taro_trace`` fetch; bad options (``taro_alpha`` 7 or true, an unknown key) are
   HTTP 400 and the engine keeps serving.
4. The same start-up and one request with ``VLLM_USE_V2_MODEL_RUNNER=0`` (the V1 runner and the feeder on CUDA).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS: list[tuple[str, bool, str]] = []


def check(name: str, ok: bool, detail: str = "") -> None:
    RESULTS.append((name, bool(ok), detail))
    print(f"{'PASS' if ok else 'FAIL'}  {name}  {detail}", flush=True)


def triton_checks() -> None:
    import torch

    from taro_vllm import mix, mix_triton

    if not mix_triton.HAS_TRITON:
        check("triton importable", False, "pip install triton (comes with the CUDA torch wheel)")
        return
    g = torch.Generator(device="cuda").manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        zb = (torch.randn(33, 151936, device="cuda", generator=g) * 6).to(dtype)
        zr = (torch.randn(33, 151936, device="cuda", generator=g) * 6).to(dtype)
        zb[1, :1024] = float("-inf")  # a fully masked leading block
        zr[2] = float("-inf")  # an all -inf row
        a = torch.rand(33, device="cuda", generator=g)
        a[0], a[3] = 0.0, 1.0
        out = mix_triton.mix_rows(zb, zr, a)
        ref = mix.mix_rows(zb, zr, a)
        fin = torch.isfinite(ref)
        err = (out[fin] - ref[fin]).abs().max().item()
        exact = torch.equal(out[0], zb[0].float()) and torch.equal(out[3], zr[3].float())
        check(f"triton mix {dtype}", err <= 1e-5 and exact and torch.equal(torch.isneginf(out), torch.isneginf(ref)),
              f"max err {err:.2e}, exact a=0/1 {exact}")
        lb, lr = mix_triton.logsumexp_pair(zb, zr)
        tb, tr = torch.logsumexp(zb.float(), -1), torch.logsumexp(zr.float(), -1)
        ok_b = torch.allclose(lb, tb, atol=1e-4)
        ok_r = torch.allclose(lr[torch.isfinite(tr)], tr[torch.isfinite(tr)], atol=1e-4) and lr[2] == float("-inf")
        check(f"triton logsumexp {dtype} (masked leading block, all -inf row)", ok_b and ok_r,
              f"max err {(lb - tb).abs().max().item():.2e}")
    free, _ = torch.cuda.mem_get_info()
    rows = (2**31) // 151936 + 2
    if free > rows * 151936 * 4 * 3.2:
        zb = torch.zeros(rows, 151936, device="cuda")
        zb[-1, 5] = 3.0
        lb, _ = mix_triton.logsumexp_pair(zb, zb)
        want = math.log(151935 + math.exp(3.0))
        check("triton int64 row offsets (rows x vocab > 2**31)", abs(lb[-1].item() - want) < 1e-3,
              f"last row lse {lb[-1].item():.4f} vs {want:.4f}")
        del zb
    else:
        check("triton int64 row offsets (rows x vocab > 2**31)", True, "skipped: not enough free GPU memory")
    zb, zr = torch.randn(32, 151936, device="cuda"), torch.randn(32, 151936, device="cuda")
    w = torch.full((32,), 0.5, device="cuda")
    mix.route_and_mix(zb, zr, override=w, needs_router=False)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(100):
        mix.route_and_mix(zb, zr, override=w, needs_router=False)
    torch.cuda.synchronize()
    check("fused fixed-a mix, batch 32, vocab 151936", True, f"{(time.perf_counter() - t0) * 10:.3f} ms/call")


def sync_census() -> None:
    """tests/test_v2_runner.py's census on CUDA: run it there with the real device."""
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-s", "tests/test_v2_runner.py", "-k",
                        "sync or nonfinite"], capture_output=True, text=True, env={**os.environ})
    lines = [ln for ln in r.stdout.splitlines() if "syncs per" in ln]
    check("TARo hot path syncs (CPU census, same code)", r.returncode == 0, "; ".join(lines) or r.stdout[-500:])


PROMPT = "Q: What is 12 + 7?\nA: Step 1:"


def post(url: str, path: str, body: dict) -> tuple[int, dict]:
    import httpx

    r = httpx.post(f"{url}/v1/{path}", json=body, timeout=120)
    return r.status_code, r.json()


def serve_checks(base: Path, reward: Path, router: Path, logs: Path, env_extra: dict, label: str) -> None:
    from benchmarks.server_process import running_server

    prompt = PROMPT
    args = [str(base), "--taro-router", str(router), "--taro-reward-model", str(reward), "--max-model-len", "2048",
            "--served-model-name", "taro", "--gpu-memory-utilization", "0.5"]
    t0 = time.time()
    try:
        with running_server(args, logs / f"taro-{label}.log", env=env_extra, timeout=900) as (url, proc, _):
            check(f"[{label}] taro-vllm serve starts", True, f"{time.time() - t0:.0f} s")
            greedy = {"model": "taro", "prompt": prompt, "max_tokens": 16, "temperature": 0, "logprobs": 5}
            outs = {}
            for mode in ("base", "reward"):
                code, out = post(url, "completions", {**greedy, "vllm_xargs": {"taro_mode": mode}})
                outs[mode] = out["choices"][0] if code == 200 else None
                check(f"[{label}] taro_mode={mode}", code == 200, str(code))
            code, out = post(url, "completions", {**greedy, "vllm_xargs": {"taro_alpha": 0.5, "taro_trace": "s1"}})
            r = __import__("httpx").get(f"{url}/v1/taro/alphas/s1", timeout=30)
            check(f"[{label}] fixed a=0.5 + trace fetch", code == 200 and r.status_code == 200
                  and r.json()["alphas"] == [0.5] * 16, f"{code} {r.status_code}")
            for bad in ({"taro_alpha": 7}, {"taro_alpha": True}, {"taro_foo": 1}):
                code, out = post(url, "completions", {**greedy, "vllm_xargs": bad})
                check(f"[{label}] bad option {bad} -> 400", code == 400, f"{code} {str(out)[:120]}")
            code, _ = post(url, "completions", greedy)
            check(f"[{label}] engine alive after bad options", code == 200 and proc.poll() is None, str(code))
            (logs / f"taro-{label}.json").write_text(json.dumps(outs))
            return outs
    except RuntimeError as e:
        check(f"[{label}] taro-vllm serve starts", False, str(e)[-800:])
        return None


def plain_vllm_greedy(model: Path, logs: Path, label: str) -> dict | None:
    """Greedy text and chosen-token logprobs of stock vLLM (our plugin not loaded) on one model, through the one
    engine driver (benchmarks.engine_run)."""
    from transformers import AutoTokenizer

    from benchmarks.engine_run import in_fresh_process

    ids = AutoTokenizer.from_pretrained(str(model))(PROMPT)["input_ids"]  # as the completions endpoint tokenizes
    spec = {"worker": "greedy", "model": str(model), "prompts": [ids], "max_tokens": 16, "dtype": "auto",
            "max_model_len": 2048, "engine_kwargs": {"gpu_memory_utilization": 0.3}}
    try:
        out = in_fresh_process(spec, env={**os.environ, "VLLM_PLUGINS": "none"}, timeout=900)["default"][0]
    except RuntimeError as e:
        (logs / f"plain-{label}.log").write_text(str(e))
        return None
    return {"text": out["text"], "logprobs": out["logprobs"]}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base")
    p.add_argument("--reward")
    p.add_argument("--router")
    p.add_argument("--keep-logs")
    a = p.parse_args(argv)
    import torch

    if not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device; this script is for a machine with a GPU", file=sys.stderr)
        return 2
    logs = Path(a.keep_logs or tempfile.mkdtemp(prefix="taro-gpu-smoke-"))
    logs.mkdir(parents=True, exist_ok=True)
    if a.base:
        base, reward, router = Path(a.base), Path(a.reward), Path(a.router)
    else:
        from taro_vllm import assets

        paths = assets.build_tiny_all()
        base, reward = paths["tiny-llama-base"], paths["tiny-llama-reward"]
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
        from engine_utils import make_router

        router = make_router(logs / "router", base, reward)
    print(f"gpu_smoke: {torch.cuda.get_device_name()} | base {base} | reward {reward} | logs {logs}", flush=True)
    triton_checks()
    sync_census()
    outs = serve_checks(base, reward, router, logs, {}, "V2 runner")
    if outs:
        for mode, model in (("base", base), ("reward", reward)):
            ref = plain_vllm_greedy(model, logs, mode)
            got = outs.get(mode)
            if ref is None or got is None:
                check(f"taro_mode={mode} equals plain vLLM on the {mode} model", False, "a run failed; see logs")
                continue
            lp_err = max(abs(x - y) for x, y in zip(got["logprobs"]["token_logprobs"], ref["logprobs"]))
            check(f"taro_mode={mode} equals plain vLLM on the {mode} model (greedy text, logprobs)",
                  got["text"] == ref["text"] and lp_err < 2e-2, f"text equal {got['text'] == ref['text']}, "
                  f"max logprob diff {lp_err:.2e}")
    serve_checks(base, reward, router, logs, {"VLLM_USE_V2_MODEL_RUNNER": "0"}, "V1 runner")
    failed = [r for r in RESULTS if not r[1]]
    print(f"\ngpu_smoke: {len(RESULTS) - len(failed)} passed, {len(failed)} failed; logs in {logs}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
