"""Where one TARo decoding batch spends its time: torch.profiler's top ops by self CPU time.

    python -m benchmarks.profile_step --w2s --batch 32 --max-tokens 16     # Qwen 1.5B base + 0.5B reward + router
    python -m benchmarks.profile_step --smoke                               # tiny models (what the test suite runs)

One in-process vLLM engine (so the model runner's ops are in the profiled process) in a fresh process; a warm-up
batch, then one profiled batch of ``--batch`` requests of ``--max-tokens`` tokens (EOS ignored, greedy). Modes:
``router`` (TARo, the checkpoint's router), ``fixed`` (a = 0.5, the GenARM mix), ``base`` (stock vLLM on the base).
Writes ``profile_<name>.json`` and ``.md``: per mode the top ops, their share of the profiled self CPU time, calls,
and the TARo stages (the named ranges ``taro::router`` and ``taro::mix`` of :func:`taro_vllm.mix.route_and_mix`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import torch

from benchmarks.engine_run import in_fresh_process
from benchmarks.throughput import _prompts, _random_router, w2s_models
from taro_vllm import assets

ROOT = Path(__file__).resolve().parent
MODES = {"router": None, "fixed": {"taro_alpha": 0.5}, "base": None}


def write_outputs(report: dict, out: Path, name: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"profile_{name}.json").write_text(json.dumps(report, indent=2) + "\n")
    lines = [f"Base `{report['base']}`, reward `{report['reward']}`, {report['dtype']}, batch {report['batch']}, "
             f"{report['max_tokens']} tokens per request after a {report['prompt_len']}-token prompt; "
             f"{report['machine']}. Command: `{report['command']}`.", ""]
    for mode, r in report["modes"].items():
        lines += [f"### {mode}: {r['wall_s']:.2f} s wall for the profiled batch, "
                  f"{r['self_cpu_total_ms']:.0f} ms self CPU in all ops", "",
                  "| op | self CPU (ms) | share | calls |", "|---|---:|---:|---:|"]
        for o in r["ops"]:
            share = o["self_cpu_ms"] / r["self_cpu_total_ms"] if r["self_cpu_total_ms"] else 0.0
            lines.append(f"| `{o['name']}` | {o['self_cpu_ms']:.1f} | {share:.1%} | {o['calls']} |")
        if r.get("taro_stages"):
            lines += ["", "| TARo stage (named range, CPU time incl. the ops inside) | CPU total (ms) | share "
                      "| calls |",
                      "|---|---:|---:|---:|"]
            lines += [f"| `{o['name']}` | {o['cpu_total_ms']:.1f} | {o['cpu_total_ms'] / r['self_cpu_total_ms']:.1%} "
                      f"| {o['calls']} |" for o in r["taro_stages"]]
        lines.append("")
    (out / f"profile_{name}.md").write_text("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", type=Path)
    p.add_argument("--reward", type=Path)
    p.add_argument("--router", type=Path, help="top-K router checkpoint (default: a random one)")
    p.add_argument("--w2s", action="store_true", help="the weak-to-strong shape (see benchmarks.throughput --w2s)")
    p.add_argument("--modes", nargs="+", default=["router", "fixed", "base"], choices=list(MODES))
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--max-tokens", type=int, default=16)
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--top", type=int, default=25)
    p.add_argument("--eager", action="store_true")
    p.add_argument("--name", help="output stem: profile_<name>.* (default w2s / smollm2 / smoke)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--smoke", action="store_true", help="tiny models, batch 2, 4 tokens, eager")
    args = p.parse_args(argv)
    name = args.name
    if args.w2s:
        args.base, args.reward, args.router = w2s_models(args.base, args.reward, args.router)
        name = name or "w2s"
    if args.smoke:
        tiny = assets.build_tiny_all()
        args.base, args.reward = args.base or tiny["tiny-llama-base"], args.reward or tiny["tiny-llama-reward"]
        args.batch, args.max_tokens, args.prompt_len, args.eager, name = 2, 4, 16, True, name or "smoke"
    base = args.base or assets.build_smollm2()
    reward = args.reward or base
    router = args.router or _random_router(Path(tempfile.mkdtemp(prefix="taro-prof-")) / "topk", base, reward, "topk")
    common = {"worker": "profile", "dtype": args.dtype, "eager": args.eager, "batch": args.batch, "top": args.top,
              "max_tokens": args.max_tokens, "max_model_len": args.prompt_len + args.max_tokens + 64,
              "prompts": _prompts(base, args.batch, args.prompt_len)}
    report = {"base": str(base), "reward": str(reward), "router": str(router), "dtype": args.dtype,
              "batch": args.batch, "max_tokens": args.max_tokens, "prompt_len": args.prompt_len,
              "machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}",
              "command": "python -m benchmarks.profile_step " + " ".join(argv if argv is not None else sys.argv[1:]),
              "modes": {}}
    for mode in args.modes:
        spec = {**common, "model": str(base), "extra_args": MODES[mode]}
        if mode != "base":
            spec.update(router=str(router), reward=str(reward))
        report["modes"][mode] = in_fresh_process(spec)
        top = report["modes"][mode]["ops"][:3]
        print(f"{mode}: {report['modes'][mode]['wall_s']:.2f} s; top ops "
              + ", ".join(f"{o['name']} {o['self_cpu_ms']:.0f} ms" for o in top), flush=True)
    write_outputs(report, args.out, name or "smollm2")
    return 0


if __name__ == "__main__":
    sys.exit(main())
