"""Online throughput against a running OpenAI server (`taro-vllm serve` / `vllm serve`): a concurrency sweep.

    taro-vllm demo &                                                  # or any TARo / plain vLLM server
    python -m benchmarks.serve_bench --url http://127.0.0.1:8000 --concurrency 1 8 32 --requests 64
    python -m benchmarks.serve_bench ... --modes router fixed:0.5 base   # per-request TARo modes, side by side

Like ``vllm bench serve``: streaming ``/v1/completions`` requests with at most C in flight, the same prompt length
and the same output length for all (``ignore_eos``), greedy. Per (mode, concurrency) it reports output tokens/s,
request throughput, time to first token (p50/p99) and time per output token (p50/p99), and writes
``serve_bench.json`` / ``serve_bench.md``. A mode is a TARo per-request option sent as ``vllm_xargs``:
``router`` (the learned router), ``fixed:A`` (GenARM weight A), ``base``, ``reward``, or ``none`` (send nothing:
for a plain vLLM server).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent
PROMPT = ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
          "How many clips did Natalia sell altogether in April and May? Let's think step by step.")


def mode_xargs(mode: str) -> dict | None:
    if mode == "none":
        return None
    if mode in ("router", "base", "reward"):
        return {"taro_mode": mode}
    if mode.startswith("fixed:"):
        return {"taro_mode": "fixed", "taro_alpha": float(mode.split(":", 1)[1])}
    raise ValueError(f"unknown mode {mode!r}: use router, fixed:A, base, reward or none")


def percentile(xs: list[float], q: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(q / 100 * (len(xs) - 1))))]


async def one_request(client: httpx.AsyncClient, url: str, body: dict) -> dict:
    t0 = time.perf_counter()
    ttft, tokens, text_chunks = None, 0, 0
    async with client.stream("POST", url + "/v1/completions", json=body) as r:
        if r.status_code != 200:
            return {"error": f"HTTP {r.status_code}: {(await r.aread())[:300]!r}"}
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("choices") and chunk["choices"][0].get("text"):
                text_chunks += 1
                if ttft is None:
                    ttft = time.perf_counter() - t0
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
    total = time.perf_counter() - t0
    if ttft is None:
        return {"error": "no tokens streamed"}
    return {"ttft": ttft, "total": total, "tokens": tokens or text_chunks,
            "tpot": (total - ttft) / max(1, (tokens or text_chunks) - 1)}


async def sweep_point(url: str, model: str, mode: str, concurrency: int, n: int, max_tokens: int) -> dict:
    body = {"model": model, "prompt": PROMPT, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
            "stream": True, "stream_options": {"include_usage": True}}
    xargs = mode_xargs(mode)
    if xargs:
        body["vllm_xargs"] = xargs
    sem = asyncio.Semaphore(concurrency)

    async def limited(client):
        async with sem:
            return await one_request(client, url, body)

    limits = httpx.Limits(max_connections=concurrency + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(600.0), limits=limits) as client:
        t0 = time.perf_counter()
        results = await asyncio.gather(*(limited(client) for _ in range(n)))
        wall = time.perf_counter() - t0
    ok = [r for r in results if "error" not in r]
    errors = [r["error"] for r in results if "error" in r]
    out_tokens = sum(r["tokens"] for r in ok)
    return {"mode": mode, "concurrency": concurrency, "requests": n, "completed": len(ok), "errors": len(errors),
            "first_error": errors[0] if errors else None, "seconds": wall, "output_tokens": out_tokens,
            "tokens_per_s": out_tokens / wall, "requests_per_s": len(ok) / wall,
            "ttft_p50_s": percentile([r["ttft"] for r in ok], 50), "ttft_p99_s": percentile([r["ttft"] for r in ok], 99),
            "tpot_p50_s": percentile([r["tpot"] for r in ok], 50), "tpot_p99_s": percentile([r["tpot"] for r in ok], 99)}


def served_model(url: str) -> str:
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    return r.json()["data"][0]["id"]


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Server {report['url']} (model `{report['model']}`), {report['max_tokens']} output tokens per request.",
             "", "| mode | concurrency | requests ok / sent | output tok/s | req/s | TTFT p50 / p99 (ms) "
             "| TPOT p50 / p99 (ms) |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        lines.append(f"| {r['mode']} | {r['concurrency']} | {r['completed']} / {r['requests']} | "
                     f"{r['tokens_per_s']:.1f} | {r['requests_per_s']:.2f} | "
                     f"{1000 * r['ttft_p50_s']:.0f} / {1000 * r['ttft_p99_s']:.0f} | "
                     f"{1000 * r['tpot_p50_s']:.1f} / {1000 * r['tpot_p99_s']:.1f} |")
    (out / "serve_bench.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", default="http://127.0.0.1:8000")
    p.add_argument("--model", help="served model name (default: the server's first model)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per sweep point")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["router"], help="router | fixed:A | base | reward | none")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    for m in args.modes:
        try:
            mode_xargs(m)
        except ValueError as e:
            p.error(str(e))
    try:
        model = args.model or served_model(args.url)
    except httpx.HTTPError as e:
        print(f"serve_bench: no OpenAI server at {args.url} ({e}); start one with `taro-vllm demo`", file=sys.stderr)
        return 2
    report = {"url": args.url, "model": model, "max_tokens": args.max_tokens, "rows": []}
    for mode in args.modes:
        for c in args.concurrency:
            row = asyncio.run(sweep_point(args.url, model, mode, c, max(args.requests, c), args.max_tokens))
            report["rows"].append(row)
            print(f"{mode:>10} c={c:<3} {row['tokens_per_s']:8.1f} tok/s  TTFT p50 {1000 * row['ttft_p50_s']:7.0f} ms"
                  f"  TPOT p50 {1000 * row['tpot_p50_s']:6.1f} ms  errors {row['errors']}", flush=True)
    write_outputs(report, args.out)
    return 1 if any(r["errors"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
