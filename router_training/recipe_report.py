"""The TAWP recipe's numbers as one markdown report, read from its run folder (nothing is re-computed).

    python -m router_training.recipe_report [RUN]     # default: <cache>/runs/smollm2-tawp; prints markdown

Sections: stage wall times, gate A (base on validation), the on-policy data, gate B (reward model vs base on held-out
on-policy pairs), gate C and the routers' validation NLL / a_t by class (from each router's train/report.json), and
the accuracy benchmark's own tables (eval/accuracy.md, or eval_full/ when FULL=1 added the full-logits
router).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def timings(run: Path) -> list[str]:
    f = run / "timings.jsonl"
    if not f.is_file():
        return []
    rows = [json.loads(line) for line in f.read_text().splitlines() if line.strip()]
    total = sum(r["seconds"] for r in rows)
    # The recipe as it stands: without superseded attempts, the optional pure-GenARM ablation (ABLATION=1) and the
    # optional full-logits routers (FULL=1), which get their own line.
    current = [r for r in rows if "superseded" not in r["stage"] and "genarm" not in r["stage"]]
    default = sum(r["seconds"] for r in current if "full" not in r["stage"])
    full = sum(r["seconds"] for r in current if "full" in r["stage"])
    return (["| stage | wall time |", "|---|---:|"] + [f"| {r['stage']} | {r['seconds'] / 60:.1f} min |" for r in rows]
            + [f"| **the recipe's current stages** (no superseded attempt, no ablation, no FULL=1) | "
               f"**{default / 60:.1f} min** |"]
            + ([f"| the FULL=1 stages (full-logits routers) | {full / 60:.1f} min |"] if full else [])
            + [f"| everything above | {total / 60:.1f} min |"])


def data_and_gate_a(run: Path) -> list[str]:
    m = _load(run / "data" / "manifest.json")
    if not m:
        return []
    g = m["gate_a"]
    out = [f"* Gate A: base greedy accuracy on {g['val_problems']} validation problems **{100 * g['base_val_greedy_accuracy']:.1f}%** "
           f"(range {g['range'][0]:.0%}-{g['range'][1]:.0%}: {'passed' if g['passed'] else 'FAILED'}); "
           f"{100 * g['checkable_error_share']:.0f}% of its first errors are of a checkable kind "
           f"({', '.join(f'{k} {v}' for k, v in g.get('error_types', {}).items())})."]
    for split in ("reward", "router"):
        s = m.get(split)
        if s:
            out.append(f"* {split} split: {s['problems']} problems, {s['samples']} samples ({m['samples_per_problem']} "
                       f"at T={m['temperature']} + 1 greedy each), {s['correct_traces']} fully correct "
                       f"({s['unique_correct']} unique), {s['pairs']} on-policy pairs; first-error types "
                       f"{s['error_types']}.")
    g = _load(run / "data" / "stats_general.json")
    if g:
        out.append(f"* general split (the router's keep-the-base term): {g['prompts']} everyday prompts disjoint from "
                   f"the OOD evaluation, {g['samples_per_prompt']} answers at T={g['temperature']} + 1 greedy each "
                   f"by the base, {g['traces']} distinct traces.")
    return out


def gate_b(run: Path, name: str = "gate_b.json", label: str = "reward model (GenARM + NLL)") -> list[str]:
    g = _load(run / name)
    if not g:
        return []
    flips = ", ".join(f"a={a}: {100 * v:.1f}%" for a, v in g["flip_rate"].items())
    out = [f"* {label}: pairwise accuracy on {g['pairs']} held-out on-policy pairs **{g['pairwise_accuracy_reward']:.3f}** "
           f"vs the base's {g['pairwise_accuracy_base']:.3f}; first divergent token flipped to the chosen one by "
           f"the mix ({g['divergent_pairs']} pairs): {flips}."]
    if "trace_nll_base" in g:
        out.append(f"  NLL/token on held-out correct traces: base {g['trace_nll_base']:.3f}, reward "
                   f"{g['trace_nll_reward']:.3f}. Gate B {'passed' if g['passed'] else 'FAILED'} "
                   f"(thresholds {g['thresholds']}).")
    return out


def routers(run: Path) -> list[str]:
    out = []
    for d in [run / "router", *sorted(run.glob("router_*"))]:
        rep = None if d.is_symlink() else _load(d / "train" / "report.json")  # "router" may link the selected one
        if not rep:
            continue
        ev = rep["eval"]
        gc = rep["gate_c"]
        cfg = rep["config"]
        steps = cfg["loop"]["max_steps"] if "loop" in cfg else cfg["steps"]  # reports before the nested FitConfig: flat
        out.append(f"* `{d.name}` ({rep['objective']}, {steps} steps, {rep['seconds']:.0f} s; "
                   f"{rep['train_rows']} train rows, {rep['train_pairs']} train pairs): validation NLL at informative "
                   f"positions {ev['nll_informative']:.4f} vs best fixed a={ev['best_fixed_a']:.2f} "
                   f"{ev['best_fixed_nll_informative']:.4f}, base {ev['base_nll_informative']:.4f}, per-token oracle "
                   f"{ev['oracle_nll_informative']:.4f}. Gate C: oracle gain over best fixed "
                   f"{100 * gc['oracle_gain_over_best_fixed']:.1f}% ({'passed' if gc['passed'] else 'FAILED'}, "
                   f"target 3%); the router closes {100 * gc['router_gap_closed']:.0f}% of that gap. Mean a "
                   f"{ev['mean_a']:.3f}; by class: "
                   + ", ".join(f"{c} {v['mean_a']:.3f}" for c, v in ev["a_by_class"].items())
                   + (f". Preference accuracy of the mix on val pairs {ev['pref_accuracy']:.3f} (base "
                      f"{ev['pref_accuracy_base']:.3f})" if "pref_accuracy" in ev else "")
                   + (f". General text (held-out prompts, {ev['general']['rows']} rows; "
                      f"{rep['general_train_rows']} train rows, weight {cfg['general_weight']}): mean a "
                      f"{ev['general']['mean_a']:.3f}, KL(base || mix) {ev['general']['kl']:.4f} (at the best fixed a: "
                      f"{ev['general']['kl_at_best_fixed_a']:.4f})" if "general" in ev else "") + ".")
    return out


def eval_dir(run: Path) -> Path:
    """The evaluation holding every router: eval_full (FULL=1: it adds the full-logits router) when it exists."""
    return run / "eval_full" if (run / "eval_full" / "accuracy.json").is_file() else run / "eval"


def versus_reward_alone(run: Path) -> list[str]:
    """The val-selected TARo against the reward model alone (a = 1), which the fixed-a selection does not include."""
    from benchmarks import stats

    acc = _load(eval_dir(run) / "accuracy.json")
    if not acc or "reward" not in acc["correct"]:
        return []
    taro, correct = acc["selection"]["taro"], acc["correct"]
    out = ["| domain | A | B | A - B (points) | A right only | B right only | p |", "|---|---|---|---:|---:|---:|---:|"]
    for task, title in (("test", "in-domain test"), ("ood", "out-of-domain")):
        m = stats.mcnemar(correct[taro][task], correct["reward"][task])
        out.append(f"| {title} | {taro} | reward | {m['diff_points']:+.1f} | {m['a_only']} | {m['b_only']} | "
                   f"{m['p']:.3g} |")
    return out


def report(run: Path) -> str:
    parts = ["### Stage wall times", "", *timings(run), "", "### Data and gate A", "", *data_and_gate_a(run), "",
             "### Reward model (gate B)", "", *gate_b(run), *gate_b(run, "gate_b_genarm.json", "pure GenARM (ablation)"),
             "", "### Routers (gate C, validation on the router split)", "", *routers(run), ""]
    acc = eval_dir(run) / "accuracy.md"
    if acc.is_file():
        parts += [f"### Accuracy through the server ({acc.parent.name}/)", "", acc.read_text()]
    vs = versus_reward_alone(run)
    if vs:
        parts += ["", "### TARo against the reward model alone (paired exact McNemar)", "", *vs]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv:
        run = Path(argv[0])
    else:
        from taro_vllm import assets

        run = assets.cache_dir() / "runs" / "smollm2-tawp"
    if not run.is_dir():
        print(f"error: {run} is not a recipe run folder (run router_training/recipes/smollm2_tawp_cpu.sh)",
              file=sys.stderr)
        return 2
    print(report(run))
    return 0


if __name__ == "__main__":
    sys.exit(main())
