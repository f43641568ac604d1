"""Start-up time of `taro-vllm serve`: launch to the first ``/health`` 200, base alone vs TARo, cold vs warm.

    python -m benchmarks.startup                  # the demo's models: SmolLM2 base alone, then TARo (base + reward)
    python -m benchmarks.startup --eager          # the same with --enforce-eager

Cold = vLLM's and inductor's compile caches pointed at empty folders (what a new user's first start sees,
minus building the SmolLM2 asset, ~25 s once); warm = the same start again on that now-filled cache. Each start is a
fresh server process, one after the other; the base alone is ``taro-vllm serve BASE`` (no --taro-router: stock vLLM
through the same console script). Writes startup.json / startup.md.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

from benchmarks.server_process import running_server

ROOT = Path(__file__).resolve().parent


def time_to_health(args: list[str], cache_root: Path, log: Path, timeout: float = 1800) -> float:
    """Seconds from launching ``taro-vllm serve ARGS`` to its first /health 200; the server is stopped after."""
    # VLLM_CACHE_ROOT is vLLM's compile cache, TORCHINDUCTOR_CACHE_DIR inductor's own (else a machine-wide folder
    # under /tmp that earlier runs filled): empty folders make a cold start.
    env = {"VLLM_CACHE_ROOT": str(cache_root), "TORCHINDUCTOR_CACHE_DIR": str(cache_root / "inductor")}
    with running_server(args, log, timeout=timeout, env=env) as (_, _, seconds):
        return seconds


def write_outputs(report: dict, out: Path, eager: bool) -> None:
    """startup[_eager].json, .md (the table) and .png (cold and warm bars per setup)."""
    out.mkdir(parents=True, exist_ok=True)
    suffix = "_eager" if eager else ""
    (out / f"startup{suffix}.json").write_text(json.dumps(report, indent=2) + "\n")
    rows = report["rows"]
    setups = list(dict.fromkeys(r["setup"] for r in rows))
    seconds = {(r["setup"], r["start"]): r["seconds"] for r in rows}
    lines = [f"`taro-vllm serve` launch -> first /health 200 (eager={eager}); base `{report['base']}`, router "
             f"`{report['router']}`.", "", "| setup | cold (empty compile cache) | warm (same cache again) |",
             "|---|---:|---:|"]
    lines += [f"| {name} | {seconds[name, 'cold']:.1f} s | {seconds[name, 'warm']:.1f} s |" for name in setups]
    (out / f"startup{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5))
    width = 0.38
    for i, kind in enumerate(("cold", "warm")):
        xs = [j + (i - 0.5) * width for j in range(len(setups))]
        bars = ax.bar(xs, [seconds[name, kind] for name in setups], width, label=kind)
        ax.bar_label(bars, fmt="%.0f s")
    ax.set_xticks(range(len(setups)), setups)
    ax.set(ylabel="seconds to first /health 200", title=f"taro-vllm serve start-up (eager={eager})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / f"startup{suffix}.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eager", action="store_true", help="serve with --enforce-eager (no torch.compile)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--only", choices=["base alone", "TARo"], help="time one setup only")
    p.add_argument("--logs", type=Path, help="keep each start's server log here (vLLM says there whether it loaded "
                                             "or recompiled each sub-model's compile cache)")
    p.add_argument("--replot", action="store_true",
                   help="rewrite OUT/startup[_eager].md and .png from the .json; measure nothing")
    args = p.parse_args(argv)
    if args.replot:
        suffix = "_eager" if args.eager else ""
        write_outputs(json.loads((args.out / f"startup{suffix}.json").read_text()), args.out, args.eager)
        return 0
    from taro_vllm import assets
    from taro_vllm.demo import demo_router

    base = assets.build_smollm2()
    router = demo_router(base)
    common = ["--dtype", "float32", "--max-model-len", "2048"] + (["--enforce-eager"] if args.eager else [])
    setups = {"base alone": [str(base), *common], "TARo": [str(base), "--taro-router", str(router), *common]}
    if args.only:
        setups = {args.only: setups[args.only]}
    rows = []
    with tempfile.TemporaryDirectory(prefix="taro-startup-") as tmp:
        for name, serve_args in setups.items():
            cache = Path(tmp) / name.replace(" ", "-")  # each setup starts from its own empty cache
            for kind in ("cold", "warm"):
                logs = args.logs or Path(tmp)
                logs.mkdir(parents=True, exist_ok=True)
                s = time_to_health(serve_args, cache, logs / f"{cache.name}-{kind}{'-eager' if args.eager else ''}.log")
                rows.append({"setup": name, "start": kind, "seconds": round(s, 1), "eager": args.eager})
                print(f"{name:>10} {kind}: {s:.1f} s", flush=True)
    write_outputs({"base": str(base), "router": str(router), "rows": rows}, args.out, args.eager)
    return 0


if __name__ == "__main__":
    sys.exit(main())
