"""Micro-benchmark of the router-mix op alone: reference vs fused, top-K vs full-logits router, and the top-K
router's features against a plain copy of the same bytes.

    python -m benchmarks.router_op                          # vocab 49k/128k/152k x batch 1/32/256, fp32
    python -m benchmarks.router_op --vocab 49152 --batch 1 32 --repeats 3    # quick
    python -m benchmarks.router_op --profile-only           # torch.profiler of the two ops at V = 151936, batch 256

Needs only torch (Triton on CUDA): runs on a GPU when one is present, else on CPU. Per shape:

* "copy" = both ``[N, V]`` logit tensors copied into preallocated buffers (what memory speed means on this machine);
* "features" = ``taro_vllm.features.topk_features`` alone (top-K ids, both row logsumexps, log-probs at the ids);
* "fixed-a mix" = ``route_and_mix`` with a per-row override (the GenARM path, no router);
* "reference" = router on the inputs, then the plain formula ``(1 - a) z_b + a z_r``;
* "fused" = ``taro_vllm.mix.route_and_mix`` with the router (features, a_t and the mix in as few passes as the
  device allows).

GB/s of copy and features count both inputs read once; GB/s of the mix, reference and fused add the fp32 output
written once. All ops of a shape are timed round-robin (one call each per round, best of at least ``--repeats``
rounds and ``--min-time`` seconds), so a load that comes and goes hits them alike. Writes ``router_op.json``,
``router_op.md`` and ``router_op.png`` (GB/s vs batch per vocabulary) and prints the two ratios the design targets:
features/copy GB/s (>= 0.25 at batch >= 32) and fused top-K / fixed-a mix time (<= 1.5 at V = 151936, batch 256).

``--profile`` (and ``--profile-only``) adds where those two ops spend their time: torch.profiler's top ops by self
time per call of the fused top-K op and of the fixed-a mix at the largest vocabulary and batch, written to
``router_op_profile.md`` / ``.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from taro_vllm import features, mix
from taro_vllm.router import RouterConfig, build_router

TARGET_FEATURES_OVER_COPY = 0.25  # features GB/s >= this fraction of copy GB/s, at batch >= 32
TARGET_FUSED_OVER_MIX = 1.5  # fused top-K time <= this multiple of the fixed-a mix, at V = 151936, batch 256


def _time_round_robin(fns: dict, device: torch.device, repeats: int, min_time: float) -> dict[str, float]:
    """Best wall time (s) of each function; each round calls every function once, in turn. At least ``repeats``
    rounds and, for quick shapes, more rounds until ``min_time`` seconds have passed: on shared cores a burst of
    other work can cover a few milliseconds of rounds whole, rarely a second."""
    def once(fn) -> float:
        t = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    for fn in fns.values():
        once(fn)  # warm-up (Triton compile, allocator)
    best = dict.fromkeys(fns, float("inf"))
    start, rounds = time.perf_counter(), 0
    while rounds < repeats or time.perf_counter() - start < min_time:
        for name, fn in fns.items():
            best[name] = min(best[name], once(fn))
        rounds += 1
    return best


def _logits(vocab: int, batch: int, device: torch.device, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    zb = (torch.randn(batch, vocab, generator=g) * 4).to(device=device, dtype=dtype)
    zr = (torch.randn(batch, vocab, generator=g) * 4).to(device=device, dtype=dtype)
    return zb, zr


def bench(vocab: int, batch: int, kinds: list[str], device: torch.device, dtype: torch.dtype,
          repeats: int, min_time: float = 0.0) -> list[dict]:
    """One row per router kind for this shape; copy, features and the fixed-a mix are timed once per shape."""
    zb, zr = _logits(vocab, batch, device, dtype)
    routers = {kind: build_router(RouterConfig(kind=kind, vocab_size=vocab)).to(device).eval() for kind in kinds}
    topk_cfg = RouterConfig(kind="topk", vocab_size=vocab)
    copy_b, copy_r = torch.empty_like(zb), torch.empty_like(zr)
    fixed_a = torch.full((batch,), 0.5, device=device)

    def copy():
        copy_b.copy_(zb)
        copy_r.copy_(zr)

    def feats():
        features.topk_features(zb, zr, topk_cfg.k, topk_cfg.source)

    def mix_only():  # the GenARM fixed-a path: what the router adds on top of it is fused - mix_only
        mix.route_and_mix(zb, zr, override=fixed_a)

    fns = {"copy": copy, "features": feats, "mix_only": mix_only}
    for kind, router in routers.items():
        fns[f"reference_{kind}"] = lambda r=router: mix.mix_reference(zb, zr, r(zb, zr))
        fns[f"fused_{kind}"] = lambda r=router: mix.route_and_mix(zb, zr, router=r)
    with torch.inference_mode():
        t = _time_round_robin(fns, device, repeats, min_time)
    bytes_in = 2 * batch * vocab * zb.element_size()
    bytes_min = bytes_in + batch * vocab * 4
    shared = {"vocab": vocab, "batch": batch, "device": device.type, "dtype": str(dtype),
              "copy_ms": 1e3 * t["copy"], "copy_GBps": bytes_in / t["copy"] / 1e9,
              "mix_only_ms": 1e3 * t["mix_only"], "mix_only_GBps": bytes_min / t["mix_only"] / 1e9}
    rows = []
    for kind in kinds:
        t_fused, t_ref = t[f"fused_{kind}"], t[f"reference_{kind}"]
        row = {**shared, "router": kind, "reference_ms": 1e3 * t_ref, "fused_ms": 1e3 * t_fused,
               "router_cost_ms": 1e3 * (t_fused - t["mix_only"]), "fused_over_mix": t_fused / t["mix_only"],
               "fused_GBps": bytes_min / t_fused / 1e9, "reference_GBps": bytes_min / t_ref / 1e9,
               "features_ms": None, "features_GBps": None, "features_over_copy": None}
        if kind == "topk":
            row.update(features_ms=1e3 * t["features"], features_GBps=bytes_in / t["features"] / 1e9,
                       features_over_copy=t["copy"] / t["features"])
        rows.append(row)
    return rows


def profile_ops(vocab: int, batch: int, device: torch.device, dtype: torch.dtype, calls: int = 5,
                top: int = 12) -> dict:
    """torch.profiler over ``calls`` calls each of the fused top-K op and of the fixed-a mix at one shape: per op its
    self time per call (ms), largest first; ``total_ms`` is all self time per call."""
    from torch.profiler import ProfilerActivity, profile

    zb, zr = _logits(vocab, batch, device, dtype)
    router = build_router(RouterConfig(kind="topk", vocab_size=vocab)).to(device).eval()
    fixed_a = torch.full((batch,), 0.5, device=device)
    ops = {"fused top-K": lambda: mix.route_and_mix(zb, zr, router=router),
           "fixed-a mix": lambda: mix.route_and_mix(zb, zr, override=fixed_a)}
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    out: dict = {"vocab": vocab, "batch": batch, "device": device.type, "dtype": str(dtype), "calls": calls, "ops": {}}
    with torch.inference_mode():
        for name, fn in ops.items():
            fn()  # warm-up
            with profile(activities=activities) as prof:
                for _ in range(calls):
                    fn()
                if device.type == "cuda":
                    torch.cuda.synchronize()
            attr = "self_device_time_total" if device.type == "cuda" else "self_cpu_time_total"
            rows = sorted(({"op": e.key, "ms": getattr(e, attr) / 1000 / calls, "calls": e.count // calls}
                           for e in prof.key_averages()), key=lambda r: -r["ms"])
            rows = [r for r in rows if not r["op"].startswith("taro::")]  # named ranges hold no self time
            out["ops"][name] = {"total_ms": sum(r["ms"] for r in rows), "top": rows[:top]}
    return out


def write_profile(prof: dict, header: str, path: Path) -> None:
    lines = [header, "", f"torch.profiler, V = {prof['vocab']}, batch {prof['batch']}, {prof['dtype']}, "
             f"{prof['calls']} calls of each op; self time per call:", ""]
    for name, r in prof["ops"].items():
        lines += [f"### {name}: {r['total_ms']:.1f} ms self time per call", "",
                  "| op | ms per call | share | calls per call |", "|---|---:|---:|---:|"]
        lines += [f"| `{o['op']}` | {o['ms']:.2f} | {o['ms'] / r['total_ms']:.1%} | {o['calls']} |" for o in r["top"]]
        lines.append("")
    path.write_text("\n".join(lines))


def targets(rows: list[dict]) -> list[str]:
    """The design targets, each with its measured value and whether it is met."""
    out = []
    for r in rows:
        if r["router"] == "topk" and r["batch"] >= 32:
            ok = r["features_over_copy"] >= TARGET_FEATURES_OVER_COPY
            out.append(f"features/copy GB/s at V={r['vocab']} N={r['batch']}: {r['features_over_copy']:.2f} "
                       f"(target >= {TARGET_FEATURES_OVER_COPY}) {'met' if ok else 'MISSED'}")
    for r in rows:
        if r["router"] == "topk" and r["vocab"] == 151936 and r["batch"] == 256:
            ok = r["fused_over_mix"] <= TARGET_FUSED_OVER_MIX
            out.append(f"fused top-K / fixed-a mix at V=151936 N=256: {r['fused_over_mix']:.2f} "
                       f"(target <= {TARGET_FUSED_OVER_MIX}) {'met' if ok else 'MISSED'}")
    return out


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def write_table(rows: list[dict], header: str, path: Path) -> None:
    lines = [header, "",
             "| vocab | batch | router | copy GB/s | features (ms) | features GB/s | features/copy | fixed-a mix (ms) "
             "| fused (ms) | fused/mix | fused GB/s | reference (ms) | router cost (ms) |",
             "|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    lines += [f"| {r['vocab']} | {r['batch']} | {r['router']} | {r['copy_GBps']:.2f} | {_fmt(r['features_ms'], '.2f')} "
              f"| {_fmt(r['features_GBps'], '.2f')} | {_fmt(r['features_over_copy'], '.2f')} | {r['mix_only_ms']:.2f} "
              f"| {r['fused_ms']:.2f} | {r['fused_over_mix']:.2f} | {r['fused_GBps']:.2f} | {r['reference_ms']:.2f} "
              f"| {r['router_cost_ms']:.2f} |" for r in rows]
    lines += ["", "Targets:", ""] + [f"- {t}" for t in targets(rows)]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], title: str, path: Path) -> None:
    """GB/s vs batch, one panel per vocabulary: copy, features, the fixed-a mix and the fused op per router kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    vocabs = sorted({r["vocab"] for r in rows})
    fig, axes = plt.subplots(1, len(vocabs), figsize=(4.5 * len(vocabs), 4), squeeze=False, sharey=True)
    for ax, v in zip(axes[0], vocabs):
        mine = sorted((r for r in rows if r["vocab"] == v), key=lambda r: r["batch"])
        topk = [r for r in mine if r["router"] == "topk"]
        first = [r for r in mine if r["router"] == mine[0]["router"]]  # one row per batch for the shared timings
        series = [("copy (inputs)", first, "copy_GBps", "k--"), ("fixed-a mix", first, "mix_only_GBps", "C0-"),
                  ("features (inputs)", topk, "features_GBps", "C1-")]
        series += [(f"fused {kind}", [r for r in mine if r["router"] == kind], "fused_GBps", f"C{2 + i}-")
                   for i, kind in enumerate(dict.fromkeys(r["router"] for r in mine))]
        for label, rs, key, style in series:
            if rs:
                ax.plot([r["batch"] for r in rs], [r[key] for r in rs], style, marker="o", label=label)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch (rows)")
        ax.set_title(f"V = {v}")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("GB/s (inputs read; mix and fused: + fp32 output)")
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _where(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name()
    return f"{torch.get_num_threads()} torch threads on {os.cpu_count()} CPUs"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--vocab", type=int, nargs="+", default=[49152, 128256, 151936])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 32, 256])
    p.add_argument("--kinds", nargs="+", default=["topk", "full"])
    p.add_argument("--dtype", default="float32")
    p.add_argument("--repeats", type=int, default=5, help="at least this many rounds per shape")
    p.add_argument("--min-time", type=float, default=2.0, help="and rounds for at least this many seconds per shape")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads on CPU (0: torch's default); "
                   "1 is steadier on cores shared with other work")
    p.add_argument("--profile", action="store_true", help="also profile the fused top-K op and the fixed-a mix at "
                   "the largest vocabulary and batch (router_op_profile.md)")
    p.add_argument("--profile-only", action="store_true", help="only that profile (no timing sweep)")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = getattr(torch, args.dtype)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.profile or args.profile_only:
        load_before = os.getloadavg()[0]
        prof = profile_ops(max(args.vocab), max(args.batch), device, dtype)
        (args.out / "router_op_profile.json").write_text(json.dumps(prof, indent=2) + "\n")
        write_profile(prof, f"device: {device.type} ({_where(device)}); 1-min load average {load_before:.2f} before, "
                      f"{os.getloadavg()[0]:.2f} after", args.out / "router_op_profile.md")
        print("\n".join(f"{k}: {v['total_ms']:.1f} ms/call, top: " + ", ".join(
            f"{o['op']} {o['ms']:.1f}" for o in v["top"][:4]) for k, v in prof["ops"].items()))
        if args.profile_only:
            return 0
    load_before = os.getloadavg()[0]
    rows = []
    for v in args.vocab:
        for b in args.batch:
            rows += bench(v, b, args.kinds, device, dtype, args.repeats, args.min_time)
            for r in rows[-len(args.kinds):]:
                extra = (f"  features {r['features_ms']:7.2f} ms ({r['features_GBps']:.2f} GB/s = "
                         f"{r['features_over_copy']:.2f} x copy {r['copy_GBps']:.2f} GB/s)"
                         if r["features_ms"] is not None else "")
                print(f"V={v:>6} N={b:>3} {r['router']:>4}: fused {r['fused_ms']:8.2f} ms = "
                      f"{r['fused_over_mix']:.2f} x fixed-a mix {r['mix_only_ms']:8.2f} ms  "
                      f"reference {r['reference_ms']:8.2f} ms{extra}", flush=True)
    header = (f"device: {device.type} ({_where(device)}), dtype {args.dtype}, best of >= {args.repeats} round-robin rounds "
              f"and >= {args.min_time:g} s per shape; "
              f"1-min load average {load_before:.2f} before, {os.getloadavg()[0]:.2f} after")
    (args.out / "router_op.json").write_text(json.dumps({"header": header, "rows": rows}, indent=2) + "\n")
    write_table(rows, header, args.out / "router_op.md")
    plot(rows, f"router_op: {header}", args.out / "router_op.png")
    print("\n".join(targets(rows)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
