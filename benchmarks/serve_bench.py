"""Online serving sweep on vLLM's own ``vllm bench serve``: per-request TARo modes x concurrency, side by side.

    taro-vllm demo &                                                  # or any TARo / plain vLLM server
    python -m benchmarks.serve_bench --url http://127.0.0.1:8000 --concurrency 1 8 32 --requests 64
    python -m benchmarks.serve_bench ... --modes router fixed:0.5 base   # per-request TARo modes, side by side

Each (mode, concurrency) point is one run of vLLM's serving benchmark (``vllm.benchmarks.serve``, the code behind
``vllm bench serve``): random prompts of ``--input-len`` tokens, ``--max-tokens`` output tokens each
(``ignore_eos``), greedy, at most C requests in flight, the TARo mode sent as ``--extra-body '{"vllm_xargs": ...}'``.
What vLLM's command lacks and this adds: the sweep over modes and concurrencies in one call, and one table
(``serve_bench.json`` / ``serve_bench.md``) of output tokens/s, requests/s, TTFT and TPOT p50/p99. A mode is
``router`` (the learned router; ``router:NAME`` one of several), ``fixed:A`` (GenARM weight A), ``base``,
``reward``, or ``none`` (send nothing: for a plain vLLM server); ``+alphas`` after a TARo mode also asks for each token's a_t in the streamed chunks
(a server started with ``--taro-return-alphas``): what returning a_t costs is ``router+alphas`` next to ``router``.
``--rounds R`` runs the whole sweep R times, interleaved, and reports each point's median output tok/s (the run
with that median), so slow drift of a shared machine does not land on one mode.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent


def mode_xargs(mode: str) -> dict | None:
    """A sweep mode's vllm_xargs: the server's ``--taro-model-alias`` mode grammar (``args.alias_xargs``), plus
    ``none`` and the ``+alphas`` suffix."""
    from taro_vllm.serving.args import alias_xargs

    mode, plus_alphas = mode.removesuffix("+alphas"), mode.endswith("+alphas")
    if mode == "none" and not plus_alphas:
        return None
    try:
        xargs = alias_xargs(mode)
    except ValueError:
        raise ValueError(f"unknown mode {mode!r}: use router, router:NAME, fixed:A, base, reward or none (+alphas: "
                         "with a_t)") from None
    return {**xargs, "taro_alphas": True} if plus_alphas else xargs


def vllm_bench_args(url: str, model: str, tokenizer: str, mode: str, concurrency: int, n: int, input_len: int,
                    max_tokens: int) -> list[str]:
    """The ``vllm bench serve`` argv of one sweep point."""
    xargs = mode_xargs(mode)
    return ["--backend", "vllm", "--base-url", url, "--model", model, "--tokenizer", tokenizer,
            "--dataset-name", "random", "--random-input-len", str(input_len), "--random-output-len", str(max_tokens),
            "--num-prompts", str(n), "--max-concurrency", str(concurrency), "--ignore-eos", "--temperature", "0",
            "--percentile-metrics", "ttft,tpot,itl", "--metric-percentiles", "50,99", "--disable-tqdm",
            "--seed", "0"] + (["--extra-body", json.dumps({"vllm_xargs": xargs})] if xargs else [])


def sweep_point(argv: list[str], mode: str, concurrency: int, n: int) -> dict:
    from vllm.benchmarks import serve as vllm_bench
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    vllm_bench.add_cli_args(parser)
    res = vllm_bench.main(parser.parse_args(argv))
    errors = [e for e in res.get("errors", []) if e]
    return {"mode": mode, "concurrency": concurrency, "requests": n, "completed": res["completed"],
            "errors": int(res.get("failed", len(errors))),
            "first_error": errors[0] if errors else None, "seconds": res["duration"],
            "output_tokens": res["total_output_tokens"], "tokens_per_s": res["output_throughput"],
            "requests_per_s": res["request_throughput"],
            "ttft_p50_s": res["median_ttft_ms"] / 1000, "ttft_p99_s": res["p99_ttft_ms"] / 1000,
            "tpot_p50_s": res["median_tpot_ms"] / 1000, "tpot_p99_s": res["p99_tpot_ms"] / 1000}


def served_model(url: str) -> tuple[str, str]:
    """(served model name, the folder it was loaded from: vLLM's ``root``, used as the benchmark's tokenizer)."""
    r = httpx.get(url + "/v1/models", timeout=30)
    r.raise_for_status()
    first = r.json()["data"][0]
    return first["id"], first.get("root") or first["id"]


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "serve_bench.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Server {report['url']} (model `{report['model']}`), {report['input_len']} prompt and "
             f"{report['max_tokens']} output tokens per request; measured by {report['tool']}.",
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
    p.add_argument("--tokenizer", help="tokenizer folder for the random prompts (default: the served model's root)")
    p.add_argument("--input-len", type=int, default=64, help="prompt tokens per request")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=64, help="requests per sweep point")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--modes", nargs="+", default=["router"],
                   help="router | fixed:A | base | reward | none; a TARo mode + '+alphas': with a_t in the chunks")
    p.add_argument("--rounds", type=int, default=1, help="repeat the sweep, interleaved; report the median run")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    for m in args.modes:
        try:
            mode_xargs(m)
        except ValueError as e:
            p.error(str(e))
    try:
        name, root = served_model(args.url)
    except httpx.HTTPError as e:
        print(f"serve_bench: no OpenAI server at {args.url} ({e}); start one with `taro-vllm demo`", file=sys.stderr)
        return 2
    model, tokenizer = args.model or name, args.tokenizer or root
    report = {"url": args.url, "model": model, "max_tokens": args.max_tokens, "input_len": args.input_len,
              "tool": "vllm bench serve (vllm.benchmarks.serve)", "rows": []}
    runs: dict[tuple[str, int], list[dict]] = {}
    for _ in range(args.rounds):
        for c in args.concurrency:
            for mode in args.modes:
                n = max(args.requests, c)
                row = sweep_point(vllm_bench_args(args.url, model, tokenizer, mode, c, n, args.input_len,
                                                  args.max_tokens), mode, c, n)
                runs.setdefault((mode, c), []).append(row)
                print(f"{mode:>10} c={c:<3} {row['tokens_per_s']:8.1f} tok/s  TTFT p50 "
                      f"{1000 * row['ttft_p50_s']:7.0f} ms  TPOT p50 {1000 * row['tpot_p50_s']:6.1f} ms  "
                      f"errors {row['errors']}", flush=True)
    for mode in args.modes:
        for c in args.concurrency:
            rows = sorted(runs[(mode, c)], key=lambda r: r["tokens_per_s"])
            median = dict(rows[(len(rows) - 1) // 2])
            median["rounds_tokens_per_s"] = [r["tokens_per_s"] for r in runs[(mode, c)]]
            median["errors"] = sum(r["errors"] for r in rows)
            report["rows"].append(median)
    report["rounds"] = args.rounds
    write_outputs(report, args.out)
    return 1 if any(r["errors"] for r in report["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
