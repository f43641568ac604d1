"""Accuracy of base / reward / fixed-a (GenARM) / TARo, served through the plugin (the code path users get).

    python -m benchmarks.accuracy --task tawp --data RUN_DATA_DIR --router CKPT [--extra-router LABEL=CKPT ...]
        [--alphas 0.1 0.25 0.5 0.75] [--n-test 400] [--n-ood 100] [--max-gsm N] --eager --out DIR   # TAWP
    python -m benchmarks.accuracy --router ROUTER_CKPT [--router-full CKPT] [--extra-router LABEL=CKPT ...]  # GSM
    python -m benchmarks.accuracy [--task tawp] --smoke                            # tiny models (test suite)

Methods, on one TARo engine in a fresh process: base alone, reward alone, a fixed a sweep (GenARM) and TARo; an
extra router (``--router-full``, ``--extra-router``) runs only its TARo method, on the same engine (each request names
its router) when it fits that engine's base and reward model, else on an engine of its own. Greedy decoding; each
method's requests go to the engine as one batch of their own.

``--task tawp`` (:mod:`benchmarks.accuracy_tawp`): the validation and test problems of a ``python -m router_training
onpolicy`` run (RUN_DATA_DIR/problems_{val,test}.jsonl), prompted exactly as in training
(``router_training.onpolicy.prompt_ids``), graded by ``tawp.check_solution(...).answer_correct``; the best fixed a and
the best TARo router are selected on validation and reported on test with Wilson CIs and paired exact McNemar tests,
the same on the out-of-domain instructions, a_t by token class, and optionally a GSM-symbolic slice (``--max-gsm``).

``--task gsm`` (default): held-out GSM-symbolic problems - the 100 original GSM8K test items (never in a training
set) plus fresh variants of the evaluation templates (``router_training.gsm.EVAL_TEMPLATE_IDS``), graded by exact
match of the final number (:mod:`benchmarks.answers`).

Out-of-domain (both tasks): short non-math instructions with exact checks (:mod:`benchmarks.ood_tasks`; why: see
there). Writes ``accuracy.json``/``.md``, ``accuracy.png`` (accuracy vs fixed a, TARo as lines), ``alphas.html``
(per-token a_t over generated outputs) and the mean a_t by token class.
"""

from __future__ import annotations

import argparse
import html
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.engine_run import in_fresh_process
from benchmarks.stats import wilson

ROOT = Path(__file__).resolve().parent
SYSTEM_HINT = "Solve the problem step by step. End with: The answer is <number>."
STEP_WORDS = {"step", "evaluate", "calculate", "compute", "therefore", "so", "answer", "total", "first", "then"}

# Per-task defaults of the flags left unset on the command line.
TASK_DEFAULTS = {
    "gsm": {"alphas": [0.25, 0.5, 0.75], "n_ood": 50, "max_tokens": 256, "out": ROOT / "results"},
    "tawp": {"alphas": [0.1, 0.25, 0.5, 0.75], "n_ood": 100, "max_tokens": 48, "out": ROOT / "results" / "tawp"},
}


def gsm_items(n_variants_per_template: int, max_items: int | None, seed: int = 1) -> list[dict]:
    from router_training import gsm

    templates = gsm.load_templates("eng")
    by_id = {t.id_orig: t for t in templates}
    # All 100 original GSM8K test items (training only ever sees generated variants of training templates) ...
    items = [{"id": gsm.original_item_id(t.id_orig), "question": t.question, "gold": gsm.split_answer(t.answer)[1]}
             for t in sorted(templates, key=lambda t: t.id_orig)]
    # ... plus fresh variants of the evaluation templates, whose variants are never trained on.
    # Templates whose variant generation takes 10 s to minutes (enumerating a constrained space) give no variants.
    slow = {410, 984, 434, 873}
    for t_id in gsm.EVAL_TEMPLATE_IDS:
        if t_id in slow or n_variants_per_template == 0:
            continue
        t = by_id[t_id]
        for k, q in enumerate(t.generate_questions(n_variants_per_template, seed=seed * 1000 + t_id, verbose=False)):
            items.append({"id": f"gsm-eval-{t_id}-v{k}", "question": q.question, "gold": gsm.split_answer(q.answer)[1]})
    return items[:max_items] if max_items else items


def token_class(piece: str) -> str:
    s = piece.strip().lower()
    if any(ch.isdigit() for ch in s):
        return "digits"
    if s and all(ch in "+-*/=x×÷()%$.:" for ch in s):
        return "operators"
    if re.sub(r"[^a-z]", "", s) in STEP_WORDS:
        return "step words"
    return "other words" if s else "whitespace"


def chat_prompt_ids(tok, text: str, hint: str | None = None) -> list[int]:
    """A one-turn chat prompt (the GSM path's in-domain prompt with ``hint``; the OOD prompt without)."""
    msgs = [{"role": "user", "content": f"{text}\n{hint}" if hint else text}]
    return list(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True,
                                        return_dict=True)["input_ids"])


# --- one engine, all its methods on all tasks (runs in a fresh process) ------------------------------------------
#
# spec: {"base", "router" (a checkpoint, or {name: checkpoint}: requests pick one by extra_args taro_router), "reward",
#        "dtype", "max_model_len", "eager",
#        "tasks": {task: {"prompts": [[token ids], ...], "max_tokens": N}},
#        "methods": [{"label", "extra_args": {vllm_xargs}, "trace": record a_t?}, ...]}
# out:  {"results": {"label|task": {"texts": [...], "traces": [{"pieces", "alphas"}, ...] or None}},
#        "seconds": {"startup": s, "label|task": s, ...}}

PROGRESS = "  [accuracy] "


def progress(msg: str) -> None:
    """A worker progress line (the parent echoes only these from the worker's stderr)."""
    print(PROGRESS + msg, file=sys.stderr, flush=True)


def engine_worker(spec_path: str, out_path: str) -> None:
    from taro_vllm import envs

    envs.engine_defaults(kv_cache_gib=2, in_process=True)
    from transformers import AutoTokenizer

    from taro_vllm.serving.llm import taro_llm

    spec = json.loads(Path(spec_path).read_text())
    tok = AutoTokenizer.from_pretrained(spec["base"])
    t0 = time.perf_counter()
    llm = taro_llm(spec["base"], spec["router"], spec.get("reward"), dtype=spec["dtype"],
                   max_model_len=spec["max_model_len"], enforce_eager=spec["eager"], seed=0)
    seconds = {"startup": round(time.perf_counter() - t0, 1)}
    progress(f"engine ready in {seconds['startup']} s")
    results: dict = {}
    for method in spec["methods"]:
        for task, t in spec["tasks"].items():
            key = f"{method['label']}|{task}"
            t0 = time.perf_counter()
            results[key] = _generate(llm, tok, t["prompts"], t["max_tokens"], method, key)
            seconds[key] = round(time.perf_counter() - t0, 1)
            progress(f"{method['label']:>16} {task}: {seconds[key]} s")
    Path(out_path).write_text(json.dumps({"results": results, "seconds": seconds}))


def _generate(llm, tok, prompts: list[list[int]], max_tokens: int, method: dict, key: str) -> dict:
    """Greedy outputs of one method on one task; with ``method["trace"]`` also each token's piece and a_t."""
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from taro_vllm.serving.alphas import RECORDER

    trace = method.get("trace", False)
    sps = [SamplingParams(max_tokens=max_tokens, temperature=0,
                          extra_args={**method["extra_args"], **({"taro_trace": f"{key}|{i}"} if trace else {})})
           for i in range(len(prompts))]
    outs = llm.generate([TokensPrompt(prompt_token_ids=ids) for ids in prompts], sps, use_tqdm=False)
    texts = [o.outputs[0].text for o in outs]
    if not trace:
        return {"texts": texts, "traces": None}
    traces = [{"pieces": [tok.decode([t]) for t in o.outputs[0].token_ids],
               "alphas": RECORDER.pop(f"{key}|{i}") or []} for i, o in enumerate(outs)]
    return {"texts": texts, "traces": traces}


def run_engine(spec: dict) -> dict:
    """Run :func:`engine_worker` in a fresh process (one engine at a time; its memory is freed on exit)."""
    return in_fresh_process(spec, module="benchmarks.accuracy", args=("--engine-worker",), echo_prefix=PROGRESS)


def engine_groups(base: str, reward: str | None, routers: dict[str, str]) -> list[dict[str, str]]:
    """Split ``{label: checkpoint}`` into engines: the first router's engine takes every router that can share it
    (the same base and reward model: :func:`taro_vllm.pairing.validate_extra_router`); any other router gets an
    engine of its own (a refusal of the first router itself is left to its engine, which names the file). Fewer
    engines, fewer starts: each costs tens of seconds to minutes on a CPU."""
    from taro_vllm.pairing import TaroSetupError, validate_extra_router, validate_setup

    labels = list(routers)
    try:
        setup = validate_setup(base, routers[labels[0]], reward)
    except TaroSetupError:
        return [{label: routers[label]} for label in labels]
    shared, alone = {labels[0]: routers[labels[0]]}, []
    for label in labels[1:]:
        try:
            validate_extra_router(setup, routers[label])
            shared[label] = routers[label]
        except TaroSetupError:
            alone.append({label: routers[label]})
    return [shared, *alone]


def run_engines(common: dict, groups: list[dict[str, str]], methods: dict[str, list[dict]]) -> tuple[dict, dict]:
    """Every router's ``methods`` (keyed by router label) on the engines of ``groups`` (:func:`engine_groups`), one
    engine at a time. Returns the results keyed 'method|task' and the seconds of each engine."""
    raw: dict = {}
    seconds: dict = {}
    for group in groups:
        todo = [m for label in group for m in methods.get(label, [])]
        if not todo:
            continue
        names = {label: f"r{i}" for i, label in enumerate(group)}  # router names inside the engine
        router = next(iter(group.values())) if len(group) == 1 else {names[k]: v for k, v in group.items()}
        if len(group) > 1:  # a TARo method's requests name their router (the others use no router)
            todo = [{**m, "extra_args": {**m["extra_args"], "taro_router": names[label]}} if _routed(m) else m
                    for label in group for m in methods.get(label, [])]
        out = run_engine({**common, "router": router, "methods": todo})
        raw.update(out["results"])
        seconds["engine " + " + ".join(group)] = out["seconds"]
    return raw, seconds


def _routed(method: dict) -> bool:
    return not {"taro_mode", "taro_alpha"} & set(method["extra_args"])


def core_methods(alphas: list[float], taro_label: str, reward_alone: bool = True) -> list[dict]:
    """The methods of the main router's engine: base, reward, the fixed a sweep, TARo (the only one traced)."""
    return ([{"label": "base", "extra_args": {"taro_mode": "base"}}]
            + ([{"label": "reward", "extra_args": {"taro_mode": "reward"}}] if reward_alone else [])
            + [{"label": fixed_label(a), "extra_args": {"taro_alpha": a}} for a in alphas]
            + [taro_method(taro_label)])


def fixed_label(a: float) -> str:
    return f"fixed a={a:g}"


def taro_method(label: str) -> dict:
    return {"label": label, "extra_args": {}, "trace": True}


def extra_routers(args: argparse.Namespace, p: argparse.ArgumentParser) -> list[tuple[str, str]]:
    """(label, checkpoint) of ``--router-full`` and each ``--extra-router LABEL=CKPT``."""
    extra = [("full-logits", str(args.router_full))] if args.router_full else []
    for spec in args.extra_router:
        label, sep, path = spec.partition("=")
        if not sep or not label or not Path(path).is_dir():
            p.error(f"--extra-router wants LABEL=CKPT_DIR, got {spec!r}")
        extra.append((label, path))
    return extra


# --- command line -------------------------------------------------------------------------------------------------

def parse_args(argv: list[str]) -> tuple[argparse.Namespace, argparse.ArgumentParser]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--task", choices=["gsm", "tawp"], default="gsm",
                   help="in-domain task: gsm (GSM-symbolic, default) or tawp (the on-policy TAWP problems)")
    p.add_argument("--data", type=Path, help="tawp: RUN_DATA_DIR of `python -m router_training onpolicy` "
                                             "(problems_val.jsonl, problems_test.jsonl)")
    p.add_argument("--router", type=Path, help="router checkpoint (names its reward model)")
    p.add_argument("--router-full", type=Path, help="full-logits router checkpoint (optional)")
    p.add_argument("--extra-router", action="append", default=[], metavar="LABEL=CKPT",
                   help="another router to compare, reported as 'TARo LABEL', on its own engine (repeatable)")
    p.add_argument("--base", type=Path, help="base model (default: SmolLM2-135M-Instruct asset)")
    p.add_argument("--reward", type=Path, help="override the reward model the router names")
    p.add_argument("--no-reward-alone", dest="reward_alone", action="store_false",
                   help="tawp: skip the reward-model-alone method (a = 1; saves one method's generations)")
    p.add_argument("--alphas", type=float, nargs="+", help="fixed a sweep (gsm: 0.25 0.5 0.75; "
                                                           "tawp: 0.1 0.25 0.5 0.75)")
    p.add_argument("--n-val", type=int, help="tawp: use the first N validation problems (default: all)")
    p.add_argument("--n-test", type=int, default=400, help="tawp: use the first N test problems")
    p.add_argument("--variants", type=int, default=2, help="fresh variants per GSM evaluation template")
    p.add_argument("--max-gsm", type=int, default=None,
                   help="gsm: cap on GSM items; tawp: add a GSM-symbolic slice of N items (reported only)")
    p.add_argument("--n-ood", type=int, help="out-of-domain instructions (gsm: 50, tawp: 100)")
    p.add_argument("--max-tokens", type=int, help="in-domain new tokens (gsm: 256, tawp: 48)")
    p.add_argument("--gsm-max-tokens", type=int, default=128, help="tawp: new tokens on the GSM slice")
    p.add_argument("--ood-max-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eager", action="store_true",
                   help="no torch.compile / CUDA graphs (vLLM enforce_eager). Use it on CPU: with torch.compile "
                        "each engine spends ~4 min starting on the 2-core machine (the AOT compile cache fails to "
                        "reload), eager starts much faster; leave it off on a GPU")
    p.add_argument("--out", type=Path, help="output folder (gsm: benchmarks/results, tawp: benchmarks/results/tawp)")
    p.add_argument("--reuse", type=Path, metavar="DIR",
                   help="tawp: take the outputs of methods an earlier run (DIR/accuracy.json) already made with the "
                        "same base, items, settings and checkpoints; run only the others (e.g. one new router)")
    p.add_argument("--smoke", action="store_true", help="tiny random models, a handful of items, 8 tokens")
    args = p.parse_args(argv)
    for key, value in TASK_DEFAULTS[args.task].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args, p


def smoke_setup(args: argparse.Namespace) -> None:
    """Tiny random base/reward models and random top-K / full-logits routers (the engine code path, no quality)."""
    from benchmarks.throughput import _random_router
    from taro_vllm import assets

    tiny = assets.build_tiny_all()
    args.base = tiny["tiny-llama-base"]
    work = Path(tempfile.mkdtemp(prefix="taro-acc-"))
    args.router = _random_router(work / "topk", args.base, tiny["tiny-llama-reward"], "topk")
    args.router_full = _random_router(work / "full", args.base, tiny["tiny-llama-reward"], "full")
    args.n_ood, args.max_tokens, args.ood_max_tokens, args.eager = 3, 8, 4, True
    if args.task == "gsm":
        args.alphas, args.variants, args.max_gsm = [0.5], 0, 3
    else:
        args.alphas, args.variants, args.max_gsm, args.gsm_max_tokens = [0.25, 0.5], 0, 2, 8


def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--engine-worker"]:
        engine_worker(argv[1], argv[2])
        return 0
    args, p = parse_args(argv)
    if args.smoke:
        smoke_setup(args)
    if args.router is None:
        p.error("--router is required (or --smoke)")
    if not (args.router / "config.json").is_file():
        p.error(f"--router {args.router}: not a router checkpoint folder (no config.json)")
    if args.task == "tawp":
        from benchmarks import accuracy_tawp

        if args.data is None and not args.smoke:
            p.error("--task tawp needs --data RUN_DATA_DIR (or --smoke)")
        report_md = accuracy_tawp.run(args, extra_routers(args, p))
    else:
        report_md = run_gsm(args, extra_routers(args, p))
    print(report_md)
    return 0


# --- the GSM task -------------------------------------------------------------------------------------------------

def run_gsm(args: argparse.Namespace, extra: list[tuple[str, str]]) -> str:
    from transformers import AutoTokenizer

    from benchmarks import answers, ood_tasks
    from taro_vllm import assets

    base = args.base or assets.build_smollm2()
    tok = AutoTokenizer.from_pretrained(str(base))
    gsm = gsm_items(args.variants, args.max_gsm)
    ood = ood_tasks.make_tasks(args.n_ood)
    tasks = {"gsm": {"prompts": [chat_prompt_ids(tok, it["question"], SYSTEM_HINT) for it in gsm],
                     "max_tokens": args.max_tokens},
             "ood": {"prompts": [chat_prompt_ids(tok, t.instruction) for t in ood], "max_tokens": args.ood_max_tokens}}
    common = {"base": str(base), "reward": str(args.reward) if args.reward else None, "dtype": args.dtype,
              "max_model_len": 1024, "eager": args.eager, "tasks": tasks}
    print(f"accuracy: {len(gsm)} in-domain, {len(ood)} out-of-domain items", flush=True)
    routers = {"TARo top-K": str(args.router), **{f"TARo {label}": path for label, path in extra}}
    methods = {label: core_methods(args.alphas, label) if k == 0 else [taro_method(label)]
               for k, label in enumerate(routers)}
    raw, _ = run_engines(common, engine_groups(common["base"], common["reward"], routers), methods)
    rows = []
    for key, res in raw.items():
        label, task = key.split("|")
        if task == "gsm":
            ok = [answers.is_correct(t, it["gold"]) for t, it in zip(res["texts"], gsm)]
        else:
            ok = [task_.check(t) for t, task_ in zip(res["texts"], ood)]
        rows.append(accuracy_row(label, task, ok))
    by_class = alpha_by_class(raw)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"base": str(base), "router": str(args.router), "extra_routers": dict(extra),
              "rows": rows, "alpha_by_token_class": by_class}
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    write_table(rows, by_class, args.out / "accuracy.md")
    plot(rows, args.out / "accuracy.png")
    write_alpha_html(raw, args.out / "alphas.html")
    return (args.out / "accuracy.md").read_text()


def accuracy_row(method: str, task: str, ok: list[bool]) -> dict:
    k, n = sum(ok), len(ok)
    lo, hi = wilson(k, n)
    return {"method": method, "task": task, "correct": k, "n": n, "accuracy": k / n if n else float("nan"),
            "ci95": [lo, hi]}


def taro_results(raw: dict, task: str):
    """(method label, result) of each TARo method on ``task``; raw is keyed 'label|task'."""
    for key, res in raw.items():
        label, t = key.split("|")
        if label.startswith("TARo") and t == task:
            yield label, res


def alpha_by_class(raw: dict) -> dict:
    """Mean a_t by token class over each TARo method's in-domain outputs: {method: {class: {mean_a, tokens}}}."""
    out: dict = {}
    for label, res in taro_results(raw, "gsm"):
        sums: dict[str, list[float]] = {}
        for tr in res["traces"]:
            for piece, a in zip(tr["pieces"], tr["alphas"]):
                if a == a:  # skip NaN
                    sums.setdefault(token_class(piece), []).append(a)
        out[label] = {c: {"mean_a": sum(v) / len(v), "tokens": len(v)} for c, v in sorted(sums.items())}
    return out


def write_table(rows: list[dict], by_class: dict, path: Path) -> None:
    lines = ["| method | in-domain GSM (95% CI) | out-of-domain instructions (95% CI) |", "|---|---|---|"]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for m in methods:
        g = next(r for r in rows if r["method"] == m and r["task"] == "gsm")
        o = next(r for r in rows if r["method"] == m and r["task"] == "ood")
        lines.append(f"| {m} | {accuracy_cell(g)} | {accuracy_cell(o)} |")
    for label, classes in by_class.items():
        lines += ["", f"| token class ({label}, in-domain outputs) | mean a_t | tokens |", "|---|---:|---:|"]
        lines += [f"| {c} | {v['mean_a']:.3f} | {v['tokens']} |" for c, v in classes.items()]
    path.write_text("\n".join(lines) + "\n")


def accuracy_cell(r: dict) -> str:
    return f"{100 * r['accuracy']:.1f}% ({100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}) [{r['correct']}/{r['n']}]"


# --- figures shared by both tasks ---------------------------------------------------------------------------------

def plot(rows: list[dict], path: Path,
         panels: tuple[tuple[str, str], ...] = (("gsm", "in-domain (GSM held-out)"), ("ood", "out-of-domain"))) -> None:
    """Accuracy vs fixed a (a = 0 base, a = 1 reward) per panel (task, title); each TARo method a dashed line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (task, title) in zip(axes[0], panels):
        pts = []
        for r in rows:
            if r["task"] != task:
                continue
            a = {"base": 0.0, "reward": 1.0}.get(r["method"])
            if r["method"].startswith("fixed a="):
                a = float(r["method"].split("=")[1])
            if a is not None:
                pts.append((a, r["accuracy"], r["ci95"]))
        pts.sort()
        ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                    yerr=[[p[1] - p[2][0] for p in pts], [p[2][1] - p[1] for p in pts]], marker="o", capsize=3,
                    label="fixed a (GenARM); a=0 base, a=1 reward")
        taro = [r for r in rows if r["task"] == task and r["method"].startswith("TARo")]
        for i, r in enumerate(taro):
            ax.axhline(r["accuracy"], linestyle="--", color=f"C{i + 1}", label=r["method"])
        ax.set_xlabel("fixed mixing weight a")
        ax.set_ylabel("accuracy")
        ax.set_title(title)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_alpha_html(raw: dict, path: Path, tasks: tuple[tuple[str, str], ...] = (("gsm", "in-domain"),),
                     n: int = 5, questions: dict[str, list[str]] | None = None) -> None:
    """The first ``n`` outputs of each TARo method on each (task, title), each token shaded by its a_t."""
    parts = ["<html><meta charset='utf-8'><body style='font-family:monospace;max-width:60em'>",
             "<p>a_t per generated token: white = base (a = 0), red = reward (a = 1); hover for the value.</p>"]
    for task, title in tasks:
        for label, res in taro_results(raw, task):
            parts.append(f"<h3>{html.escape(label)}, {html.escape(title)}</h3>")
            for i, tr in enumerate(res["traces"][:n]):
                if questions:
                    parts.append(f"<p style='color:#666'>{html.escape(questions[task][i])}</p>")
                parts.append("<p>")
                for piece, a in zip(tr["pieces"], tr["alphas"]):
                    a = 0.0 if a != a else a
                    parts.append(f"<span title='a={a:.3f}' style='background:rgba(220,40,40,{a:.3f})'>"
                                 f"{html.escape(piece).replace(chr(10), '<br>')}</span>")
                parts.append("</p><hr>")
    parts.append("</body></html>")
    path.write_text("".join(parts))


if __name__ == "__main__":
    sys.exit(main())
