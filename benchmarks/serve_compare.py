"""Online serving under load, TARo vs plain vLLM on the same base, with vLLM's own ``vllm bench serve``.

    python -m benchmarks.serve_compare                     # SmolLM2-135M: plain vLLM, then TARo, c = 1 / 8 / 32 / 64
    python -m benchmarks.serve_compare --modes router fixed:0.5 --concurrency 1 32
    python -m benchmarks.serve_compare --w2s               # Qwen 1.5B base, the W2S recipe's 0.5B reward + router
    python -m benchmarks.serve_compare --w2s --concurrency 64 --add   # one more point into the same table
    python -m benchmarks.serve_compare --modes router fixed:0.5 base --mixed --concurrency 8 32 64 --name serve_mixed

Starts ``taro-vllm serve BASE`` without a router (plain vLLM, nothing of TARo in the engine), sweeps it with
benchmarks.serve_bench (mode ``none``), stops it; then ``taro-vllm serve BASE --taro-router R`` (a random router: the
weights do not change the cost) and sweeps each TARo mode. Each point: ``2 x concurrency`` requests (at least 8) of
``--input-len`` random prompt tokens and ``--max-tokens`` output tokens (EOS ignored). Writes serve_compare.json /
.md (TTFT and TPOT p50 / p99, output tok/s, and TARo's TPOT p50 over plain vLLM's per concurrency) and
serve_compare.png (TPOT p50 and output tok/s vs concurrency). ``--add`` measures only the given points (both servers,
side by side as always) and merges them into the earlier run's table of the same setup; each row keeps its date.
``--mixed`` sends the TARo modes at once instead of one after another: at concurrency C, one ``vllm bench serve``
client per mode, started together, each with C / (number of modes) requests in flight, so every engine step batches
rows of all modes; each mode's row is its own client's numbers, at the total concurrency C (mode ``router [mixed]``).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks import serve_bench
from benchmarks.server_process import running_server
from benchmarks.throughput import _random_router, w2s_models
from taro_vllm import assets

ROOT = Path(__file__).resolve().parent
SERVER_ENV = {"VLLM_CPU_KVCACHE_SPACE": "4", "HF_HUB_OFFLINE": "1"}


def _bench_argv(url: str, c: int, modes: list[str], args, out: Path) -> list[str]:
    return ["--url", url, "--concurrency", str(c), "--requests", str(max(8, 2 * c)), "--max-tokens",
            str(args.max_tokens), "--input-len", str(args.input_len), "--modes", *modes, "--out", str(out)]


def mixed_point(url: str, c: int, modes: list[str], args, work: Path) -> list[dict]:
    """All ``modes`` at once: one ``vllm bench serve`` client per mode (a process each), started together, with
    c // len(modes) requests in flight each (at least 1); a row per mode, from its own client, listed at c."""
    per = max(1, c // len(modes))
    procs = []
    for i, mode in enumerate(modes):
        out = work / f"mixed-c{c}-{i}"
        procs.append((mode, out, subprocess.Popen([sys.executable, "-m", "benchmarks.serve_bench",
                                                   *_bench_argv(url, per, [mode], args, out)])))
    rows = []
    for mode, out, proc in procs:
        if proc.wait() != 0:
            raise RuntimeError(f"the {mode} client of the mixed point c={c} failed (exit {proc.returncode})")
        for r in json.loads((out / "serve_bench.json").read_text())["rows"]:
            rows.append({**r, "mode": f"{mode} [mixed]", "concurrency": c, "client_concurrency": per,
                         "mixed_with": modes})
    return rows


def sweep(argv: list[str], modes: list[str], args, work: Path, label: str, mixed: bool = False) -> list[dict]:
    rows = []
    with running_server(argv, work / f"{label}.log", timeout=1200, env=SERVER_ENV) as (url, _proc, startup):
        print(f"{label}: up in {startup:.0f} s", flush=True)
        for c in args.concurrency:
            out = work / f"{label}-c{c}"
            if mixed:
                got = mixed_point(url, c, modes, args, work)
            else:
                serve_bench.main(_bench_argv(url, c, modes, args, out))
                got = json.loads((out / "serve_bench.json").read_text())["rows"]
            when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
            rows += [{"server": label, **r, "measured_at": when} for r in got]
    return rows


SETUP_KEYS = ("base", "reward", "router", "dtype", "max_tokens", "input_len", "eager", "mixed")


def check_same_setup(earlier: dict, setup: dict) -> None:
    """ValueError naming what differs: points of different setups in one table would compare unlike with unlike."""
    differ = [k for k in SETUP_KEYS if earlier.get(k) != setup.get(k)]
    if differ:
        raise ValueError("--add: the earlier run had another setup (" + ", ".join(
            f"{k}: {earlier.get(k)!r} vs {setup.get(k)!r}" for k in differ) + ")")


def merge(earlier: dict, report: dict) -> dict:
    """``report`` with the rows of ``earlier`` (the same setup) that it did not re-measure, ratios recomputed."""
    check_same_setup(earlier, report)
    key = lambda r: (r["server"], r["mode"], r["concurrency"])  # noqa: E731
    new = {key(r) for r in report["rows"]}
    rows = sorted([r for r in earlier["rows"] if key(r) not in new] + report["rows"],
                  key=lambda r: (r["server"] != "plain vLLM", r["mode"], r["concurrency"]))
    return {**report, "rows": rows, "ratios": ratios(rows)}


def ratios(rows: list[dict]) -> dict:
    """TARo's TPOT p50 over plain vLLM's, per TARo mode and concurrency (target at the equal-size pair: <= 2.1)."""
    plain = {r["concurrency"]: r for r in rows if r["server"] == "plain vLLM"}
    out: dict = {}
    for r in rows:
        if r["server"] == "TARo" and r["concurrency"] in plain:
            out[f"{r['mode']} c={r['concurrency']}"] = r["tpot_p50_s"] / plain[r["concurrency"]]["tpot_p50_s"]
    return out


def mixed_rates(rows: list[dict]) -> dict[int, float]:
    """Per concurrency of a ``--mixed`` run, the output tok/s of all TARo clients summed (empty for other runs)."""
    summed: dict[int, float] = {}
    for r in rows:
        if r["server"] == "TARo" and r["mode"].endswith("[mixed]"):
            summed[r["concurrency"]] = summed.get(r["concurrency"], 0.0) + r["tokens_per_s"]
    return dict(sorted(summed.items()))


def mixed_slowdown(rows: list[dict]) -> dict:
    """Per concurrency of a ``--mixed`` run: plain vLLM's output tok/s over the summed tok/s of all TARo clients.

    Why next to the per-mode TPOT ratios: the modes share every engine step, so how one step's cost splits between
    the clients follows which client's prefills land in the other's decode steps (the client that starts decoding
    first waits through the other's prefills); the summed output rate is what the shared steps cost, split-free."""
    plain = {r["concurrency"]: r["tokens_per_s"] for r in rows if r["server"] == "plain vLLM"}
    return {f"all modes [mixed] c={c}": plain[c] / tps for c, tps in mixed_rates(rows).items()
            if c in plain and tps > 0}


def write_outputs(report: dict, out: Path, name: str = "serve_compare") -> None:
    out.mkdir(parents=True, exist_ok=True)
    report = {**report, **({"mixed_slowdown": slow} if (slow := mixed_slowdown(report["rows"])) else {})}
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Base `{report['base']}`, reward `{report['reward']}`, {report['dtype']}, {report['input_len']} prompt "
             f"+ {report['max_tokens']} output tokens per request, `vllm bench serve`; {report['machine']}.", "",
             "| server | mode | concurrency | requests ok | output tok/s | TTFT p50 / p99 (ms) | TPOT p50 / p99 (ms) "
             "| measured |", "|---|---|---:|---:|---:|---:|---:|---|"]
    for r in report["rows"]:
        lines.append(f"| {r['server']} | {r['mode']} | {r['concurrency']} | {r['completed']} / {r['requests']} | "
                     f"{r['tokens_per_s']:.1f} | {1000 * r['ttft_p50_s']:.0f} / {1000 * r['ttft_p99_s']:.0f} | "
                     f"{1000 * r['tpot_p50_s']:.1f} / {1000 * r['tpot_p99_s']:.1f} | {r.get('measured_at', '-')} |")
    lines += ["", "| TARo TPOT p50 / plain vLLM TPOT p50 | ratio |", "|---|---:|"]
    lines += [f"| {k} | **{v:.2f}** |" for k, v in report["ratios"].items()]
    if "mixed_slowdown" in report:
        lines += ["", "| plain vLLM output tok/s / all TARo clients' output tok/s summed | ratio |", "|---|---:|"]
        lines += [f"| {k} | **{v:.2f}** |" for k, v in report["mixed_slowdown"].items()]
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # Latency percentiles vs concurrency: p50 solid, p99 dashed, one colour per (server, mode).
    fig, (ax1, ax2, ax3) = plt.subplots(1, 3, figsize=(15, 4.2))
    for i, key in enumerate(dict.fromkeys((r["server"], r["mode"]) for r in report["rows"])):
        pts = sorted((r["concurrency"], r) for r in report["rows"] if (r["server"], r["mode"]) == key)
        label, colour, cs = (key[0] if key[1] == "none" else f"{key[0]} ({key[1]})"), f"C{i}", [c for c, _ in pts]
        for ax, metric in ((ax1, "tpot"), (ax2, "ttft")):
            ax.plot(cs, [1000 * r[f"{metric}_p50_s"] for _, r in pts], marker="o", color=colour, label=f"{label} p50")
            ax.plot(cs, [1000 * r[f"{metric}_p99_s"] for _, r in pts], ls="--", color=colour, label=f"{label} p99")
        ax3.plot(cs, [r["tokens_per_s"] for _, r in pts], marker="o", color=colour, label=label)
    if summed := mixed_rates(report["rows"]):  # a --mixed run: the shared steps' output rate, all clients together
        ax3.plot(list(summed), list(summed.values()), marker="s", ls=":", color="k", label="TARo (all modes summed)")
    for ax, title in ((ax1, "TPOT (ms)"), (ax2, "TTFT (ms)"), (ax3, "output tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("concurrent clients")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="base model dir (default: SmolLM2-135M-Instruct asset)")
    p.add_argument("--reward", type=Path, help="reward model dir (default: the base itself)")
    p.add_argument("--router", type=Path, help="top-K router checkpoint (default: a random one)")
    p.add_argument("--w2s", action="store_true", help="weak-to-strong shape: Qwen2.5-Coder-1.5B base with the W2S "
                                                      "TAWP recipe's 0.5B reward model and router")
    p.add_argument("--name", help="output file stem (default serve_compare, --w2s: serve_compare_w2s)")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--modes", nargs="+", default=["router"], help="TARo modes (serve_bench syntax)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--replot", action="store_true", help="redraw the table and plot from the JSON (no servers)")
    p.add_argument("--mixed", action="store_true", help="send the TARo modes at once (one client per mode, "
                                                        "concurrency split between them) instead of one by one")
    p.add_argument("--add", action="store_true", help="merge the points measured into the earlier run's JSON of the "
                                                      "same setup (re-measured points replace theirs)")
    args = p.parse_args(argv)
    name = args.name or ("serve_compare_w2s" if args.w2s else "serve_compare")
    if args.replot:
        write_outputs(json.loads((args.out / f"{name}.json").read_text()), args.out, name)
        return 0
    if args.w2s:
        args.base, args.reward, args.router = w2s_models(args.base, args.reward, args.router)
    base = args.base or assets.build_smollm2()
    reward = args.reward or base
    earlier_path = args.out / f"{name}.json"
    if args.add and not earlier_path.is_file():
        p.error(f"--add: no earlier run at {earlier_path}")
    if args.add and not args.router:
        p.error("--add needs the router of the earlier run (--router, or --w2s with the recipe's router)")
    setup = {"base": str(base), "reward": str(reward), "router": str(args.router), "dtype": args.dtype,
             "max_tokens": args.max_tokens, "input_len": args.input_len, "eager": args.eager,
             **({"mixed": True} if args.mixed else {})}
    if args.add:
        try:  # before any server starts: a mismatch found after the sweep would waste it
            check_same_setup(json.loads(earlier_path.read_text()), setup)
        except ValueError as e:
            p.error(str(e))
    work = Path(tempfile.mkdtemp(prefix="taro-serve-compare-"))
    common = ["--dtype", args.dtype, "--max-model-len", str(args.input_len + args.max_tokens + 64),
              "--served-model-name", "taro", "--seed", "0"] + (["--enforce-eager"] if args.eager else [])
    rows = sweep([str(base), *common], ["none"], args, work, "plain vLLM")
    router = args.router or _random_router(work / "router", base, reward, "topk")
    rows += sweep([str(base), "--taro-router", str(router), "--taro-reward-model", str(reward), *common], args.modes,
                  args, work, "TARo", mixed=args.mixed)
    report = {**setup, "router": str(router),
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}", "rows": rows, "ratios": ratios(rows)}
    if args.add:
        report = merge(json.loads(earlier_path.read_text()), report)
    write_outputs(report, args.out, name)
    print(json.dumps(report["ratios"], indent=2))
    return 0 if all(r["errors"] == 0 for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
