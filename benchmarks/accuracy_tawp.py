"""``python -m benchmarks.accuracy --task tawp``: base < best fixed a < TARo on TAWP, measured (issue 14, item 5).

The flow, top to bottom in :func:`run`:

1. items: the validation and test problems of an on-policy run (RUN_DATA_DIR/problems_{val,test}.jsonl, one
   ``tawp.Problem.to_json()`` per line), the out-of-domain instructions, and optionally a GSM-symbolic slice;
2. prompts: in-domain (and the GSM slice) exactly as in sampling/training (``router_training.onpolicy.prompt_ids``
   = the chat template over ``tawp.messages(question)``), OOD as a plain one-turn chat;
3. engines: the main router's engine runs base, reward, the fixed a sweep and TARo; each extra router's engine
   runs only its TARo; every method on every task, greedy;
4. grading: ``tawp.check_solution(text, problem).answer_correct`` in-domain, the task's own check OOD,
   ``answers.is_correct`` on the GSM slice;
5. :func:`build_report` (pure: hand-made inputs in the tests): accuracy + Wilson CIs, selection on validation
   (best fixed a, ties -> smaller a; best TARo router), paired exact McNemar tests on test and OOD, a_t by token class,
   and the issue's target pattern, each marked held or not;
6. files: accuracy.json (everything, per-item correctness included), accuracy.md, accuracy.png, alphas.html.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path

from benchmarks import stats
from benchmarks.accuracy import (accuracy_cell, accuracy_row, core_methods, engine_groups, fixed_label, gsm_items,
                                 plot, run_engines, taro_method, write_alpha_html)

IN_DOMAIN = "test"  # where results are reported; "val" only selects
SMOKE_SIZES = {"val": 4, "test": 4}


@dataclass
class Items:
    val: list  # tawp.Problem
    test: list  # tawp.Problem
    ood: list  # ood_tasks.Task
    gsm: list[dict]  # {"id", "question", "gold"}; empty = no GSM slice

    def tasks(self) -> list[str]:
        return ["val", "test", "ood"] + (["gsm"] if self.gsm else [])

    def ids(self, task: str) -> list[str]:
        return [it["id"] if isinstance(it, dict) else it.id for it in getattr(self, task)]

    def questions(self, task: str) -> list[str]:
        if task == "ood":
            return [t.instruction for t in self.ood]
        if task == "gsm":
            return [it["question"] for it in self.gsm]
        return [p.question for p in getattr(self, task)]

    def context_words(self, task: str) -> list[tuple[str, ...]]:
        """Per item, the words of the question that a_t on 'names/items' refers to (OOD: the quoted word)."""
        if task == "ood":
            return [ood_context_words(t.instruction) for t in self.ood]
        return [p.context_words for p in getattr(self, task)]


def ood_context_words(instruction: str) -> tuple[str, ...]:
    m = re.search(r"'([^']+)'", instruction)
    return (m.group(1),) if m else ()


# --- 1. items -----------------------------------------------------------------------------------------------------

def load_problems(path: Path, limit: int | None) -> list:
    from router_training import tawp

    if not path.is_file():
        raise SystemExit(f"{path}: missing (written by `python -m router_training onpolicy --out RUN_DATA_DIR`)")
    probs = [tawp.Problem.from_json(json.loads(line)) for line in path.read_text().splitlines() if line.strip()]
    if limit is not None and len(probs) < limit:
        print(f"note: {path.name} has {len(probs)} problems (asked for {limit})", flush=True)
    return probs[:limit] if limit is not None else probs


def load_items(args: argparse.Namespace) -> Items:
    from benchmarks import ood_tasks
    from router_training import tawp

    if args.smoke:
        splits = tawp.make_splits(SMOKE_SIZES)
        val, test = splits["val"], splits["test"]
    else:
        val = load_problems(args.data / "problems_val.jsonl", args.n_val)
        test = load_problems(args.data / "problems_test.jsonl", args.n_test)
    gsm = gsm_items(args.variants, args.max_gsm) if args.max_gsm else []
    return Items(val, test, ood_tasks.make_tasks(args.n_ood), gsm)


# --- 2. prompts ---------------------------------------------------------------------------------------------------

def engine_tasks(tok, items: Items, args: argparse.Namespace) -> dict:
    from benchmarks.accuracy import chat_prompt_ids
    from router_training.onpolicy import prompt_ids

    max_tokens = {"val": args.max_tokens, "test": args.max_tokens, "ood": args.ood_max_tokens,
                  "gsm": args.gsm_max_tokens}
    return {task: {"prompts": [chat_prompt_ids(tok, q) if task == "ood" else prompt_ids(tok, q)
                               for q in items.questions(task)],
                   "max_tokens": max_tokens[task]}
            for task in items.tasks()}


# --- 4. grading ---------------------------------------------------------------------------------------------------

def grade(raw: dict, items: Items) -> dict[str, dict[str, list[bool]]]:
    """{method: {task: [item correct]}} from the engines' outputs (raw is keyed 'label|task')."""
    from benchmarks import answers
    from router_training import tawp

    checks = {"val": lambda text, p: tawp.check_solution(text, p).answer_correct,
              "test": lambda text, p: tawp.check_solution(text, p).answer_correct,
              "ood": lambda text, t: t.check(text),
              "gsm": lambda text, it: answers.is_correct(text, it["gold"])}
    correct: dict[str, dict[str, list[bool]]] = {}
    for key, res in raw.items():
        label, task = key.split("|")
        correct.setdefault(label, {})[task] = [bool(checks[task](text, it))
                                               for text, it in zip(res["texts"], getattr(items, task))]
    return correct


# --- 5. the report (pure) -----------------------------------------------------------------------------------------

def select_methods(correct: dict, alphas: list[float], taro_labels: list[str]) -> dict:
    """Selection on validation only: the best fixed a (ties -> smaller a) and the best TARo router (ties -> first)."""
    val = {m: sum(ok["val"]) / len(ok["val"]) if ok["val"] else 0.0 for m, ok in correct.items()}
    best_a = stats.select_best_alpha({a: val[fixed_label(a)] for a in alphas})
    return {"val_accuracy": val, "best_fixed_alpha": best_a, "best_fixed": fixed_label(best_a),
            "taro": stats.select_best_label({m: val[m] for m in taro_labels})}


def comparison_pairs(selection: dict, taro_labels: list[str]) -> list[tuple[str, str]]:
    taro, fixed = selection["taro"], selection["best_fixed"]
    return [(taro, "base"), (taro, fixed), (fixed, "base")] + [(t, "base") for t in taro_labels if t != taro]


def compare(correct: dict, pairs: list[tuple[str, str]], task: str) -> list[dict]:
    return [{"a": a, "b": b, **stats.mcnemar(correct[a][task], correct[b][task])} for a, b in pairs]


def alpha_by_class(traces: list[dict], context_words: list[tuple[str, ...]]) -> dict:
    """Mean a_t per token class (``tawp.token_class`` with each item's context words), plus 'all'."""
    from router_training import tawp

    sums: dict[str, list[float]] = {}
    for tr, words in zip(traces, context_words):
        for piece, a in zip(tr["pieces"], tr["alphas"]):
            if a == a:  # skip NaN
                sums.setdefault(tawp.token_class(piece, words), []).append(a)
                sums.setdefault("all", []).append(a)
    return {c: {"mean_a": sum(v) / len(v), "tokens": len(v)} for c, v in sorted(sums.items())}


def pooled_mean(classes: dict, names: tuple[str, ...]) -> float | None:
    n = sum(classes[c]["tokens"] for c in names if c in classes)
    return sum(classes[c]["mean_a"] * classes[c]["tokens"] for c in names if c in classes) / n if n else None


def paper_pattern(acc: dict, comparisons: dict, by_class: dict, selection: dict) -> list[dict]:
    """The issue's targets for the val-selected TARo and best fixed a, each with its numbers and whether it held."""
    taro, fixed = selection["taro"], selection["best_fixed"]
    pts = {(m, t): 100 * acc[m][t]["accuracy"] for m in ("base", fixed, taro) for t in (IN_DOMAIN, "ood")}
    b, f, t = (pts[(m, IN_DOMAIN)] for m in ("base", fixed, taro))
    ob, of, ot = (pts[(m, "ood")] for m in ("base", fixed, taro))
    vs_base = next(c for c in comparisons[IN_DOMAIN] if c["a"] == taro and c["b"] == "base")
    cls = by_class[taro]
    math_a = pooled_mean(cls[IN_DOMAIN], ("digits", "operators"))
    # Context words as the fidelity note defines them: names and items from the question, and other words.
    ctx_a = pooled_mean(cls[IN_DOMAIN], ("names/items", "other words"))
    ood_a = pooled_mean(cls["ood"], ("all",))

    def row(target: str, measured: str, holds: bool | None) -> dict:
        return {"target": target, "measured": measured, "holds": holds}

    ratio = math_a / ctx_a if math_a is not None and ctx_a else None
    return [
        row("in-domain: base < best fixed a < TARo", f"{b:.1f} < {f:.1f} < {t:.1f}", b < f < t),
        row("in-domain: TARo - base significant (McNemar p < 0.05)",
            f"{t - b:+.1f} points, p = {vs_base['p']:.3g}", t > b and vs_base["p"] < 0.05),
        row("in-domain: TARo >= best fixed a + 3 points", f"{t - f:+.1f} points", t - f >= 3),
        row("OOD: TARo within 2 points of base", f"{ot - ob:+.1f} points", abs(ot - ob) <= 2),
        row("OOD: best fixed a loses >= 5 points vs base", f"{of - ob:+.1f} points", ob - of >= 5),
        row("mean a_t on digits/operators >= 2x context words (names/items + other words; in-domain)",
            f"{_fmt(math_a)} vs {_fmt(ctx_a)}" + (f" ({ratio:.2f}x)" if ratio is not None else ""),
            None if ratio is None else ratio >= 2),
        row("mean a_t on OOD outputs <= 0.1", _fmt(ood_a), None if ood_a is None else ood_a <= 0.1),
    ]


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.3f}"


def build_report(correct: dict, alphas: list[float], taro_labels: list[str], by_class: dict) -> dict:
    """Everything computed from per-item correctness and a_t by class; no engine involved."""
    rows = [accuracy_row(m, t, ok) for m, tasks in correct.items() for t, ok in tasks.items()]
    acc = {m: {r["task"]: r for r in rows if r["method"] == m} for m in correct}
    selection = select_methods(correct, alphas, taro_labels)
    pairs = comparison_pairs(selection, taro_labels)
    comparisons = {task: compare(correct, pairs, task) for task in (IN_DOMAIN, "ood")}
    return {"rows": rows, "selection": selection, "comparisons": comparisons, "alpha_by_token_class": by_class,
            "pattern": paper_pattern(acc, comparisons, by_class, selection), "correct": correct}


# --- 6. files -----------------------------------------------------------------------------------------------------

def write_md(report: dict, path: Path) -> None:
    sel, rows = report["selection"], report["rows"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cell = {(r["method"], r["task"]): r for r in rows}
    tasks = [t for t in (IN_DOMAIN, "ood", "gsm") if (methods[0], t) in cell]
    role = {sel["best_fixed"]: " **<- best fixed a (val-selected)**", sel["taro"]: " **<- TARo (val-selected)**"}
    s = report["settings"]
    lines = ["# TAWP accuracy through the plugin: base / reward / fixed a (GenARM) / TARo", "",
             f"base `{report['base']}`; routers: " + ", ".join(f"{k} = `{v}`" for k, v in report["routers"].items())
             + f"; data `{report['data']}`.",
             f"Items: {s['n_val']} validation, {s['n_test']} test, {s['n_ood']} out-of-domain"
             + (f", {s['n_gsm']} GSM-symbolic (slice, reported only)" if s["n_gsm"] else "")
             + f". Greedy, {s['max_tokens']} new tokens in-domain, {s['ood_max_tokens']} OOD"
             + f"; eager={s['eager']}, {s['dtype']}. Wall time {report['seconds']['total'] / 60:.1f} min.", "",
             "## Validation (selection only: the best fixed a, ties -> smaller a; the best TARo router)", "",
             "| method | validation accuracy (95% CI) |", "|---|---|"]
    lines += [f"| {m}{role.get(m, '')} | {accuracy_cell(cell[(m, 'val')])} |" for m in methods]
    titles = {IN_DOMAIN: "in-domain test", "ood": "out-of-domain", "gsm": "GSM-symbolic slice"}
    lines += ["", "## Test and out-of-domain (95% Wilson CI)", "",
              "| method | " + " | ".join(titles[t] for t in tasks) + " |", "|---" * (len(tasks) + 1) + "|"]
    lines += [f"| {m}{role.get(m, '')} | " + " | ".join(accuracy_cell(cell[(m, t)]) for t in tasks) + " |"
              for m in methods]
    lines += ["", "## Paired exact McNemar tests (two-sided binomial on discordant items)", "",
              "| domain | A | B | A - B (points) | A right only | B right only | p |",
              "|---|---|---|---:|---:|---:|---:|"]
    for task in (IN_DOMAIN, "ood"):
        lines += [f"| {titles[task]} | {c['a']} | {c['b']} | {c['diff_points']:+.1f} | {c['a_only']} | "
                  f"{c['b_only']} | {c['p']:.3g} |" for c in report["comparisons"][task]]
    lines += ["", *alpha_table(report["alpha_by_token_class"]), "",
              f"## Against the issue's target pattern (TARo = {sel['taro']}, best fixed a = {sel['best_fixed']})", "",
              "| target | measured | holds |", "|---|---|---|"]
    mark = {True: "yes", False: "**no**", None: "n/a"}
    lines += [f"| {r['target']} | {r['measured']} | {mark[r['holds']]} |" for r in report["pattern"]]
    path.write_text("\n".join(lines) + "\n")


def alpha_table(by_class: dict) -> list[str]:
    cols = [(m, t) for m in by_class for t in (IN_DOMAIN, "ood")]
    classes = sorted({c for m, t in cols for c in by_class[m][t]}, key=lambda c: (c == "all", c))
    head = "| token class | " + " | ".join(f"{m}, {'in-domain' if t == IN_DOMAIN else 'OOD'}" for m, t in cols)
    out = ["## Mean a_t by token class (tokens in parentheses)", "", head + " |", "|---" + "|---:" * len(cols) + "|"]
    for c in classes:
        vals = [by_class[m][t].get(c) for m, t in cols]
        out.append(f"| {c} | " + " | ".join(f"{v['mean_a']:.3f} ({v['tokens']})" if v else "-" for v in vals) + " |")
    return out


def write_json(report: dict, raw: dict, items: Items, path: Path) -> None:
    outputs: dict = {}
    for key, res in raw.items():
        label, task = key.split("|")
        entry = {"texts": res["texts"]}
        if res["traces"] is not None:
            entry["traces"] = [{"pieces": tr["pieces"], "alphas": [round(a, 4) for a in tr["alphas"]]}
                               for tr in res["traces"]]
        outputs.setdefault(label, {})[task] = entry
    correct = {m: {t: [int(x) for x in ok] for t, ok in tasks.items()} for m, tasks in report["correct"].items()}
    full = {**report, "items": {t: items.ids(t) for t in items.tasks()}, "correct": correct, "outputs": outputs}
    path.write_text(json.dumps(full, indent=1) + "\n")


# --- the run ------------------------------------------------------------------------------------------------------

def reusable_outputs(prev_path: Path, base: str, settings: dict, items: Items,
                     routers: dict[str, str]) -> dict[str, dict]:
    """The methods of an earlier run (``--reuse DIR``) that need not run again: {label: {task: outputs}}.

    Greedy decoding repeats exactly on the same engine settings, so an earlier run's outputs are this run's when the
    base, the items, the settings and the reward model are the same. The base / reward / fixed-a methods are reused
    only with the same main router checkpoint (it names the reward model); a TARo label only with the same
    checkpoint. Anything else is refused (a mismatch of items or settings) or rerun (another router)."""
    path = prev_path / "accuracy.json" if prev_path.is_dir() else prev_path
    try:
        prev = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise SystemExit(f"--reuse {prev_path}: cannot read an accuracy.json there ({e})") from None
    if prev.get("task") != "tawp" or "outputs" not in prev:
        raise SystemExit(f"--reuse {path}: not a TAWP accuracy.json with outputs")
    old = {"reward_override": None, **prev.get("settings", {})}
    problems = [f"base {prev.get('base')} != {base}"] if prev.get("base") != base else []
    problems += [f"{k}: {old.get(k)!r} != {v!r}" for k, v in settings.items() if old.get(k) != v]
    problems += [f"items of {t} differ" for t in items.tasks() if prev.get("items", {}).get(t) != items.ids(t)]
    if problems:
        raise SystemExit(f"--reuse {path}: the earlier run is not this one's: " + "; ".join(problems))
    same = {label for label, ckpt in routers.items() if prev.get("routers", {}).get(label) == ckpt}
    main_same = next(iter(routers)) in same
    keep = {}
    for label, tasks in prev["outputs"].items():
        if (label in same if label in prev.get("routers", {}) else main_same):
            if set(tasks) >= set(items.tasks()):
                keep[label] = {t: {"texts": o["texts"], "traces": o.get("traces")} for t, o in tasks.items()
                               if t in items.tasks()}
    print(f"reusing {sorted(keep)} from {path}", flush=True)
    return keep


def run(args: argparse.Namespace, extra: list[tuple[str, str]]) -> str:
    from transformers import AutoTokenizer

    from taro_vllm import assets

    t_start = time.perf_counter()
    base = args.base or assets.build_smollm2()
    items = load_items(args)
    tok = AutoTokenizer.from_pretrained(str(base))
    common = {"base": str(base), "reward": str(args.reward) if args.reward else None, "dtype": args.dtype,
              "max_model_len": 1024, "eager": args.eager, "tasks": engine_tasks(tok, items, args)}
    # The main router's engine runs every method; each extra router's engine only its TARo.
    routers = {"TARo": str(args.router), **{f"TARo {label}": path for label, path in extra}}
    print(f"accuracy (tawp): {len(items.val)} val, {len(items.test)} test, {len(items.ood)} OOD, "
          f"{len(items.gsm)} GSM items; {len(routers)} engine(s)", flush=True)
    settings = {"n_val": len(items.val), "n_test": len(items.test), "n_ood": len(items.ood), "n_gsm": len(items.gsm),
                "max_tokens": args.max_tokens, "ood_max_tokens": args.ood_max_tokens,
                "gsm_max_tokens": args.gsm_max_tokens, "eager": args.eager, "dtype": args.dtype,
                "reward_override": common["reward"]}
    raw: dict = {}
    seconds: dict = {}
    reusable = reusable_outputs(args.reuse, str(base), settings, items, routers) if args.reuse else {}
    reused: dict = {}
    methods: dict = {}
    for k, label in enumerate(routers):
        mine = core_methods(args.alphas, label, getattr(args, "reward_alone", True)) if k == 0 \
            else [taro_method(label)]
        for m in mine:
            if m["label"] in reusable:
                raw.update({f"{m['label']}|{t}": o for t, o in reusable[m["label"]].items()})
                reused[m["label"]] = str(args.reuse)
        methods[label] = [m for m in mine if m["label"] not in reusable]
        if not methods[label]:
            seconds[f"engine {label}"] = f"reused from {args.reuse}"
    out, engine_seconds = run_engines(common, engine_groups(common["base"], common["reward"], routers), methods)
    raw.update(out)
    seconds.update(engine_seconds)
    by_class = {label: {t: alpha_by_class(raw[f"{label}|{t}"]["traces"], items.context_words(t))
                        for t in (IN_DOMAIN, "ood")} for label in routers}
    report = build_report(grade(raw, items), args.alphas, list(routers), by_class)
    seconds["total"] = round(time.perf_counter() - t_start, 1)
    report = {"task": "tawp", "base": str(base), "data": str(args.data) if args.data else "smoke (tawp.make_splits)",
              "routers": routers, "selected_router": routers[report["selection"]["taro"]], "alphas": args.alphas,
              "settings": settings, "reused": reused, "seconds": seconds, **report}
    args.out.mkdir(parents=True, exist_ok=True)
    write_json(report, raw, items, args.out / "accuracy.json")
    write_md(report, args.out / "accuracy.md")
    panels = ((IN_DOMAIN, "in-domain (TAWP test)"), ("ood", "out-of-domain"))
    plot(report["rows"], args.out / "accuracy.png", panels=panels)
    write_alpha_html(raw, args.out / "alphas.html", tasks=panels,
                     questions={t: items.questions(t) for t in (IN_DOMAIN, "ood")})
    return (args.out / "accuracy.md").read_text()
