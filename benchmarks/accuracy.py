"""Accuracy of base / reward / fixed-a (GenARM) / TARo, served through the plugin (the code path users get).

    python -m benchmarks.accuracy --router ROUTER_CKPT [--router-full CKPT] [--extra-router LABEL=CKPT ...]
    python -m benchmarks.accuracy --smoke                                          # tiny models (test suite)

* In-domain: held-out GSM-symbolic problems - the 100 original GSM8K test items (never in a training set) plus fresh
  variants of the evaluation templates (``router_training.gsm.EVAL_TEMPLATE_IDS``), graded by exact match of the
  final number (:mod:`benchmarks.answers`).
* Out-of-domain: short non-math instructions with exact checks (:mod:`benchmarks.ood_tasks`; why: see there).
* Methods, on one TARo engine per router: base alone, reward alone, fixed a sweep (GenARM), TARo top-K, and TARo
  full-logits when ``--router-full`` is given, and any ``--extra-router`` (e.g. one trained with the preference
  objective). Greedy decoding.

Writes ``accuracy.json``/``.md`` (accuracy with 95% Wilson intervals), ``accuracy.png`` (accuracy vs fixed a, TARo
as lines), ``alphas.html`` (per-token a_t over generated solutions) and the mean a_t by token class.
"""

from __future__ import annotations

import argparse
import html
import json
import math
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
SYSTEM_HINT = "Solve the problem step by step. End with: The answer is <number>."
STEP_WORDS = {"step", "evaluate", "calculate", "compute", "therefore", "so", "answer", "total", "first", "then"}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    if n == 0:
        return (float("nan"), float("nan"))
    p = k / n
    d = 1 + z * z / n
    c = (p + z * z / (2 * n)) / d
    h = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / d
    return (max(0.0, c - h), min(1.0, c + h))


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


# --- one engine, all its methods (runs in a fresh process) ------------------------------------------------------

def engine_worker(spec_path: str, out_path: str) -> None:
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")
    from transformers import AutoTokenizer
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from taro_vllm.serving.alphas import RECORDER
    from taro_vllm.serving.llm import taro_llm

    spec = json.loads(Path(spec_path).read_text())
    tok = AutoTokenizer.from_pretrained(spec["base"])
    llm = taro_llm(spec["base"], spec["router"], spec.get("reward"), dtype=spec["dtype"],
                   max_model_len=spec["max_model_len"], enforce_eager=spec["eager"], seed=0)

    def chat_ids(text: str, hint: str | None) -> list[int]:
        msgs = [{"role": "user", "content": f"{text}\n{hint}" if hint else text}]
        return tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]

    results: dict = {}
    for method in spec["methods"]:
        xargs = method["extra_args"]
        for task, items, max_tokens, hint in (("gsm", spec["gsm"], spec["max_tokens"], SYSTEM_HINT),
                                              ("ood", spec["ood"], spec["ood_max_tokens"], None)):
            prompts = [TokensPrompt(prompt_token_ids=chat_ids(it["question"], hint)) for it in items]
            sps = [SamplingParams(max_tokens=max_tokens, temperature=0,
                                  extra_args={**xargs, "taro_trace": f"{method['label']}|{task}|{i}"})
                   for i in range(len(items))]
            outs = llm.generate(prompts, sps, use_tqdm=False)
            texts = [o.outputs[0].text for o in outs]
            traces = []
            for i, o in enumerate(outs):
                alphas = RECORDER.pop(f"{method['label']}|{task}|{i}") or []
                pieces = [tok.decode([t]) for t in o.outputs[0].token_ids]
                traces.append({"pieces": pieces, "alphas": alphas})
            results[f"{method['label']}|{task}"] = {"texts": texts, "traces": traces}
            print(f"  {method['label']:>16} {task}: done", file=sys.stderr, flush=True)
    Path(out_path).write_text(json.dumps(results))


def run_engine(spec: dict) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        sp, op = Path(tmp) / "spec.json", Path(tmp) / "out.json"
        sp.write_text(json.dumps(spec))
        r = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--engine-worker", str(sp), str(op)],
                           cwd=ROOT.parent, capture_output=True, text=True)
        if r.returncode != 0:
            raise RuntimeError(r.stderr[-4000:])
        return json.loads(op.read_text())


# --- orchestration and reporting ----------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv[:1] == ["--engine-worker"]:
        engine_worker(argv[1], argv[2])
        return 0
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--router", type=Path, help="top-K router checkpoint (names its reward model)")
    p.add_argument("--router-full", type=Path, help="full-logits router checkpoint (optional)")
    p.add_argument("--extra-router", action="append", default=[], metavar="LABEL=CKPT",
                   help="another router to compare, reported as 'TARo LABEL' (repeatable)")
    p.add_argument("--base", type=Path, help="base model (default: SmolLM2-135M-Instruct asset)")
    p.add_argument("--reward", type=Path, help="override the reward model the router names")
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--variants", type=int, default=2, help="fresh variants per evaluation template")
    p.add_argument("--max-gsm", type=int, default=None)
    p.add_argument("--n-ood", type=int, default=50)
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--ood-max-tokens", type=int, default=24)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--eager", action="store_true")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    p.add_argument("--smoke", action="store_true", help="tiny models, 3+3 items, 8 tokens")
    args = p.parse_args(argv)

    from benchmarks import answers, ood_tasks
    from taro_vllm import assets

    if args.smoke:
        from benchmarks.throughput import _random_router

        tiny = assets.build_tiny_all()
        args.base = tiny["tiny-llama-base"]
        work = Path(tempfile.mkdtemp(prefix="taro-acc-"))
        args.router = _random_router(work / "topk", args.base, tiny["tiny-llama-reward"], "topk")
        args.router_full = _random_router(work / "full", args.base, tiny["tiny-llama-reward"], "full")
        args.alphas, args.variants, args.max_gsm, args.n_ood = [0.5], 0, 3, 3
        args.max_tokens, args.ood_max_tokens, args.eager = 8, 4, True
    if args.router is None:
        p.error("--router is required (or --smoke)")
    base = args.base or assets.build_smollm2()
    gsm = gsm_items(args.variants, args.max_gsm)
    ood = ood_tasks.make_tasks(args.n_ood)
    common = {"base": str(base), "reward": str(args.reward) if args.reward else None, "dtype": args.dtype,
              "max_model_len": 1024, "eager": args.eager, "max_tokens": args.max_tokens,
              "ood_max_tokens": args.ood_max_tokens, "gsm": gsm,
              "ood": [{"id": t.id, "question": t.instruction} for t in ood]}
    methods = ([{"label": "base", "extra_args": {"taro_mode": "base"}},
                {"label": "reward", "extra_args": {"taro_mode": "reward"}}]
               + [{"label": f"fixed a={a:g}", "extra_args": {"taro_alpha": a}} for a in args.alphas]
               + [{"label": "TARo top-K", "extra_args": {}}])
    print(f"accuracy: {len(gsm)} in-domain, {len(ood)} out-of-domain items", flush=True)
    raw = run_engine({**common, "router": str(args.router), "methods": methods})
    extra = [("full-logits", str(args.router_full))] if args.router_full else []
    for spec in args.extra_router:
        label, sep, path = spec.partition("=")
        if not sep or not label or not Path(path).is_dir():
            p.error(f"--extra-router wants LABEL=CKPT_DIR, got {spec!r}")
        extra.append((label, path))
    for label, path in extra:
        raw.update(run_engine({**common, "router": path, "methods": [{"label": f"TARo {label}", "extra_args": {}}]}))
    rows = []
    for key, res in raw.items():
        label, task = key.split("|")
        if task == "gsm":
            ok = [answers.is_correct(t, it["gold"]) for t, it in zip(res["texts"], gsm)]
        else:
            ok = [task_.check(t) for t, task_ in zip(res["texts"], ood)]
        k, n = sum(ok), len(ok)
        lo, hi = wilson(k, n)
        rows.append({"method": label, "task": task, "correct": k, "n": n, "accuracy": k / n if n else float("nan"),
                     "ci95": [lo, hi]})
    by_class = alpha_by_class(raw)
    args.out.mkdir(parents=True, exist_ok=True)
    report = {"base": str(base), "router": str(args.router), "extra_routers": dict(extra),
              "rows": rows, "alpha_by_token_class": by_class}
    (args.out / "accuracy.json").write_text(json.dumps(report, indent=2) + "\n")
    write_table(rows, by_class, args.out / "accuracy.md")
    plot(rows, args.alphas, args.out / "accuracy.png")
    write_alpha_html(raw, args.out / "alphas.html")
    print((args.out / "accuracy.md").read_text())
    return 0


def taro_in_domain(raw: dict):
    """(method label, result) of each TARo method on the in-domain task; raw is keyed 'label|task'."""
    for key, res in raw.items():
        label, task = key.split("|")
        if label.startswith("TARo") and task == "gsm":
            yield label, res


def alpha_by_class(raw: dict) -> dict:
    """Mean a_t by token class over each TARo method's in-domain outputs: {method: {class: {mean_a, tokens}}}."""
    out: dict = {}
    for label, res in taro_in_domain(raw):
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
    cell = lambda r: f"{100 * r['accuracy']:.1f}% ({100 * r['ci95'][0]:.0f}-{100 * r['ci95'][1]:.0f}) " \
                     f"[{r['correct']}/{r['n']}]"  # noqa: E731
    for m in methods:
        g = next(r for r in rows if r["method"] == m and r["task"] == "gsm")
        o = next(r for r in rows if r["method"] == m and r["task"] == "ood")
        lines.append(f"| {m} | {cell(g)} | {cell(o)} |")
    for label, classes in by_class.items():
        lines += ["", f"| token class ({label}, in-domain outputs) | mean a_t | tokens |", "|---|---:|---:|"]
        lines += [f"| {c} | {v['mean_a']:.3f} | {v['tokens']} |" for c, v in classes.items()]
    path.write_text("\n".join(lines) + "\n")


def plot(rows: list[dict], alphas: list[float], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, task, title in ((axes[0], "gsm", "in-domain (GSM held-out)"), (axes[1], "ood", "out-of-domain")):
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


def write_alpha_html(raw: dict, path: Path, n: int = 5) -> None:
    parts = ["<html><meta charset='utf-8'><body style='font-family:monospace;max-width:60em'>"]
    for label, res in taro_in_domain(raw):
        parts.append(f"<h3>{html.escape(label)}: a_t per token (white = base, red = reward)</h3>")
        for tr in res["traces"][:n]:
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
