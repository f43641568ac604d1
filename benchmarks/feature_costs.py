"""What the per-request features cost, side by side in one run: a_t returned in the responses vs not, and four
routers mixed in one batch vs one router.

    python -m benchmarks.feature_costs                # SmolLM2-135M base + reward, batch / concurrency 32
    python -m benchmarks.feature_costs --smoke        # tiny models, a few tokens (what the test suite runs)
    python -m benchmarks.feature_costs --url URL      # the a_t comparison against a running --taro-return-alphas server
    python -m benchmarks.feature_costs --only alphas  # re-measure one comparison; the other is kept from the last run

* a_t in responses: one ``taro-vllm serve --taro-return-alphas`` and vLLM's own ``vllm bench serve`` (through
  benchmarks.serve_bench) at concurrency 32: mode ``router`` vs ``router+alphas`` (streamed chunks carry a_t),
  alternating for ``--rounds`` rounds; the median output tok/s of each. Target: >= 0.98x.
* routers: one engine (offline LLM, fresh process) holding four routers, batch 32, every request on the default
  router vs the requests spread over the four (round-robin, so every step mixes them), alternating for
  ``--rounds`` rounds; the median tok/s of each. Target: >= 0.95x.

Random routers (the weights do not change the cost). Writes ``feature_costs.json`` / ``feature_costs.md``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.engine_run import in_fresh_process
from benchmarks.throughput import _prompts, _random_router
from taro_vllm import assets

ROOT = Path(__file__).resolve().parent
ROUTERS = ("r0", "r1", "r2", "r3")


def routers_cost(base: Path, reward: Path, work: Path, args) -> dict:
    routers = {}
    for i, name in enumerate(ROUTERS):
        torch.manual_seed(i)
        routers[name] = str(_random_router(work / name, base, reward, "topk"))
    runs = []
    for r in range(args.rounds):
        runs += [{"label": f"one router#{r}"},
                 {"label": f"4 routers mixed#{r}", "extra_args_cycle": [{"taro_router": n} for n in ROUTERS]}]
    spec = {"worker": "throughput", "model": str(base), "router": routers, "reward": str(reward),
            "dtype": args.dtype, "eager": args.eager, "max_model_len": args.prompt_len + args.max_tokens + 64,
            "max_tokens": args.max_tokens, "prompts": _prompts(base, args.batch, args.prompt_len),
            "batch_sizes": [args.batch], "runs": runs}
    out = in_fresh_process(spec, env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"})
    per = {"one router": [], "4 routers mixed": []}
    for row in out["results"]:
        per[row["label"].split("#")[0]].append(row["tokens_per_s"])
    one, four = statistics.median(per["one router"]), statistics.median(per["4 routers mixed"])
    return {"batch": args.batch, "one_router_tok_s": per["one router"], "four_routers_tok_s": per["4 routers mixed"],
            "ratio_four_over_one": four / one}


def alphas_cost(base: Path, reward: Path, work: Path, args) -> dict:
    from contextlib import nullcontext

    from benchmarks import serve_bench
    from benchmarks.server_process import running_server

    router = _random_router(work / "served", base, reward, "topk")
    argv = [str(base), "--taro-router", str(router), "--taro-return-alphas", "--dtype", args.dtype,
            "--max-model-len", str(args.prompt_len + args.max_tokens + 64), "--served-model-name", "taro"]
    if args.eager:
        argv.append("--enforce-eager")
    server = nullcontext((args.url, None, 0.0)) if args.url else running_server(
        argv, work / "server.log", timeout=900, env={"VLLM_CPU_KVCACHE_SPACE": "2", "HF_HUB_OFFLINE": "1"})
    with server as (url, _proc, _):
        rc = serve_bench.main(["--url", url, "--concurrency", str(args.batch), "--requests", str(args.requests),
                               "--max-tokens", str(args.max_tokens), "--input-len", str(args.prompt_len),
                               "--modes", "router", "router+alphas", "--rounds", str(args.rounds),
                               "--out", str(work / "serve_bench")])
    report = json.loads((work / "serve_bench" / "serve_bench.json").read_text())
    rows = {r["mode"]: r for r in report["rows"]}
    plain, with_alphas = rows["router"], rows["router+alphas"]
    return {"concurrency": args.batch, "errors": rc != 0,
            "router_tok_s": plain["rounds_tokens_per_s"], "router_alphas_tok_s": with_alphas["rounds_tokens_per_s"],
            "tpot_p50_ms": {"router": 1000 * plain["tpot_p50_s"], "router+alphas": 1000 * with_alphas["tpot_p50_s"]},
            "ratio_alphas_over_plain": with_alphas["tokens_per_s"] / plain["tokens_per_s"]}


def paired_median(treated: list[float], control: list[float]) -> float:
    """Median of the per-round ratios (rounds alternate, so each round's pair shares the machine's state)."""
    return statistics.median(t / c for t, c in zip(treated, control))


def write_outputs(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "feature_costs.json").write_text(json.dumps(report, indent=2) + "\n")
    a, r = report["alphas"], report["routers"]
    when = lambda part: f" ({part.get('rounds', report['rounds'])} rounds, {part['measured_at']})" \
        if "measured_at" in part else ""  # noqa: E731
    lines = [f"Base `{report['base']}`, reward `{report['reward']}`, {report['dtype']}, {report['max_tokens']} "
             f"output tokens per request, alternating rounds (median); {report['machine']}.", "",
             "| comparison | per-round output tok/s | ratio of medians (target) | median of per-round ratios |",
             "|---|---|---:|---:|",
             f"| a_t in the streamed responses vs not (`vllm bench serve`, concurrency {a['concurrency']}) | "
             f"{', '.join(f'{x:.1f}' for x in a['router_alphas_tok_s'])} vs "
             f"{', '.join(f'{x:.1f}' for x in a['router_tok_s'])}{when(a)} | **{a['ratio_alphas_over_plain']:.3f}** (>= 0.98) | "
             f"{paired_median(a['router_alphas_tok_s'], a['router_tok_s']):.3f} |",
             f"| 4 routers mixed in one batch vs one router (offline engine, batch {r['batch']}) | "
             f"{', '.join(f'{x:.1f}' for x in r['four_routers_tok_s'])} vs "
             f"{', '.join(f'{x:.1f}' for x in r['one_router_tok_s'])}{when(r)} | **{r['ratio_four_over_one']:.3f}** (>= 0.95) | "
             f"{paired_median(r['four_routers_tok_s'], r['one_router_tok_s']):.3f} |"]
    (out / "feature_costs.md").write_text("\n".join(lines) + "\n")
    plot(report, out / "feature_costs.png")


def plot(report: dict, path: Path) -> None:
    """Output tok/s per alternating round, with vs without each feature: the spread the ratios sit in."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    a, r = report["alphas"], report["routers"]
    panels = [(f"a_t in streamed responses (concurrency {a['concurrency']})", a["router_alphas_tok_s"], "with a_t",
               a["router_tok_s"], "without", a["ratio_alphas_over_plain"], 0.98),
              (f"routers in one batch (offline, batch {r['batch']})", r["four_routers_tok_s"], "4 routers mixed",
               r["one_router_tok_s"], "1 router", r["ratio_four_over_one"], 0.95)]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for ax, (title, treated, t_label, control, c_label, ratio, target) in zip(axes, panels):
        rounds = range(1, len(treated) + 1)
        ax.plot(rounds, control, "o-", label=c_label)
        ax.plot(rounds, treated, "s-", label=t_label)
        ax.set(title=f"{title}\nratio of medians {ratio:.3f} (target >= {target})", xlabel="round",
               ylabel="output tok/s")
        ax.set_xticks(list(rounds))
        ax.set_ylim(bottom=0)
        ax.legend()
    fig.suptitle(f"feature costs, {report['machine']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="base model dir (default: SmolLM2-135M-Instruct asset)")
    p.add_argument("--reward", type=Path, help="reward model dir (default: the base itself)")
    p.add_argument("--batch", type=int, default=32, help="batch size / concurrency")
    p.add_argument("--requests", type=int, default=64, help="requests per serving round")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--url", help="a running taro-vllm serve --taro-return-alphas (default: start one)")
    p.add_argument("--smoke", action="store_true", help="tiny models, batch 4, 4 tokens, 1 round, eager")
    p.add_argument("--only", choices=["alphas", "routers"],
                   help="measure only this comparison; the other one is kept from OUT/feature_costs.json (each "
                        "row says when and with which settings it was measured)")
    p.add_argument("--replot", action="store_true",
                   help="rewrite OUT/feature_costs.md and .png from OUT/feature_costs.json; measure nothing")
    args = p.parse_args(argv)
    if args.replot:
        write_outputs(json.loads((args.out / "feature_costs.json").read_text()), args.out)
        return 0
    if args.smoke:
        tiny = assets.build_tiny_all()
        args.base, args.reward = args.base or tiny["tiny-llama-base"], args.reward or tiny["tiny-llama-reward"]
        args.batch, args.requests, args.max_tokens, args.prompt_len, args.rounds = 4, 4, 4, 16, 1
        args.eager = True
    base = args.base or assets.build_smollm2()
    reward = args.reward or base
    work = Path(tempfile.mkdtemp(prefix="taro-feature-costs-"))
    report = {"base": str(base), "reward": str(reward), "dtype": args.dtype, "max_tokens": args.max_tokens,
              "rounds": args.rounds, "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}"}
    previous = args.out / "feature_costs.json"
    if args.only:
        if not previous.is_file():
            p.error(f"--only {args.only}: {previous} holds no earlier run to keep the other comparison from")
        report.update({k: v for k, v in json.loads(previous.read_text()).items() if k in ("routers", "alphas")})
    settings = {"rounds": args.rounds, "max_tokens": args.max_tokens, "batch": args.batch,
                "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    if args.only in (None, "routers"):
        report["routers"] = {**routers_cost(base, reward, work, args), **settings}
        print(f"4 routers mixed / one router: {report['routers']['ratio_four_over_one']:.3f}", flush=True)
    if args.only in (None, "alphas"):
        report["alphas"] = {**alphas_cost(base, reward, work, args), **settings}
        print(f"a_t returned / not: {report['alphas']['ratio_alphas_over_plain']:.3f}", flush=True)
    write_outputs(report, args.out)
    return 1 if report["alphas"]["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
