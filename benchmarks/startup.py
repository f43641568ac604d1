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


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--eager", action="store_true", help="serve with --enforce-eager (no torch.compile)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--only", choices=["base alone", "TARo"], help="time one setup only")
    p.add_argument("--logs", type=Path, help="keep each start's server log here (vLLM says there whether it loaded "
                                             "or recompiled each sub-model's compile cache)")
    args = p.parse_args(argv)
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
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_eager" if args.eager else ""
    (args.out / f"startup{suffix}.json").write_text(json.dumps({"base": str(base), "router": str(router),
                                                                 "rows": rows}, indent=2) + "\n")
    lines = [f"`taro-vllm serve` launch -> first /health 200 (eager={args.eager}); base `{base}`, router `{router}`.",
             "", "| setup | cold (empty compile cache) | warm (same cache again) |", "|---|---:|---:|"]
    for name in setups:
        cold, warm = (next(r["seconds"] for r in rows if r["setup"] == name and r["start"] == k)
                      for k in ("cold", "warm"))
        lines.append(f"| {name} | {cold:.1f} s | {warm:.1f} s |")
    (args.out / f"startup{suffix}.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
