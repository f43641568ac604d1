"""Train the TARo router on a feature cache (:mod:`router_training.feature_cache`): seconds per run for the top-K
router, minutes for the full-logits one (``--kind full`` on a cache built with ``--full-rows``).

Objective (primary, ``nll``): the NLL of the mix ``softmax((1 - a_t) z_base + a_t z_reward)`` over verified-correct
traces, weighted toward informative rows (weight 1 where the models disagree or the target is a checked digit /
operator / "="; ``other_weight`` elsewhere). Why weighted: ~90% of positions are ones both models agree on, and
their gradient only says "any a is fine", which drowns the few positions where routing matters.

Variant ``nll+pref``: plus ``pref_weight`` x the preference on the mix over the router split's on-policy pairs,
``-log sigmoid(beta * (log p_mix(chosen) - log p_mix(rejected)))``: directly "the mix should prefer the corrected
line". The router split's pairs and traces are disjoint from the reward model's training pairs.

Optional term (``--general-cache``): the base's own answers to general, non-math prompts
(:mod:`router_training.general`); there ``general_weight`` x the KL from the base's next-token distribution to the
mix (``feature_cache.cached_kl_to_base``) asks the router to leave text the reward model knows nothing about to the
base. Without it the router never sees such text and keeps a_t near its in-domain level out of domain.

Every evaluation (held-out problems of the router split) reports the router's NLL next to each fixed a (GenARM) and
the per-token oracle a (the best a of the grid for each row), i.e. Gate C: is there anything to route? And the mean
a_t per token class. Selection between routers is done on validation *accuracy* by ``benchmarks.accuracy``.

The steps run through :func:`router_training.loop.run`, the reward model's and the router trainer's loop. Like the
router trainer's, the config nests the router's ``RouterConfig`` (``router``: its kind, K and vocabulary are the
cache's) and the shared ``LoopConfig`` (``loop``); report.json records them nested the same way.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Literal

import torch

from router_training import feature_cache as fc
from router_training import configs, loop, runtime
from router_training.configs import arg
from router_training.errors import TrainingSetupError
from router_training.loop import LoopConfig
from router_training.losses import pair_loss
from router_training.router_trainer import VOCAB_FROM_MODELS, sized
from taro_vllm.checkpoint import save_router
from taro_vllm.router import FullRouter, Router, RouterConfig, build_router

GRID = tuple(i / 20 for i in range(21))


def fit_router_spec(**kw: Any) -> RouterConfig:
    """A RouterConfig with this fit's defaults (embed 16, hidden 64, RouterConfig's init_bias: a = 0.1); the kind,
    K and vocabulary are the cache's, filled in by :func:`fit` (:func:`cached_router`)."""
    return RouterConfig(**{"vocab_size": VOCAB_FROM_MODELS, "embed_dim": 16, "hidden_dim": 64, **kw})


def fit_loop(**kw: Any) -> LoopConfig:
    """The fit's loop: constant lr, ``batch_size`` cached rows per step, and no checkpoints or resume (a fit takes
    seconds, and its row sampler is a running generator, not a function of the step)."""
    return LoopConfig(**{"lr": 1e-3, "warmup": 0, "weight_decay": 1e-4, "batch_size": 512, "max_steps": 1000,
                         "eval_every": 250, "checkpoint_every": 0, **kw})


# Fields of the nested configs that are not the fit's to choose: the router's shape is the cache's (its kind is
# chosen: top-K, or full when the cache kept full rows), and there is no
# resumable state (nor a device: the cached rows are trained on the CPU). The CLI offers no flag for them.
CACHE_FIELDS = frozenset({"source", "k", "vocab_size"})
NO_STATE_FIELDS = frozenset({"device", "resume", "keep_state", "checkpoint_every", "stop_after"})


@dataclass
class FitConfig:
    cache: str = arg(help="feature cache folder (python -m router_training features)")
    out: str = arg(help="output folder (the router checkpoint; logs and report.json go to OUT/train/)")
    objective: Literal["nll", "nll+pref"] = arg("nll", "nll, or nll + the preference on the mix over the pairs")
    other_weight: float = arg(0.1, "weight of non-informative rows")
    pref_weight: float = arg(0.5, "weight of the preference term (objective nll+pref)")
    pref_beta: float = arg(0.1, "beta of the preference term")
    pair_batch: int = arg(16, "pairs per step for the preference term")
    val_fraction: float = arg(0.15, "problems held out for validation")
    general_cache: str = arg("", "feature cache of the base's own answers to general prompts (python -m "
                                 "router_training general, then features): adds the keep-the-base KL term")
    general_weight: float = arg(1.0, "weight of the KL term on the general cache")
    general_batch: int = arg(256, "general rows per step")
    router: RouterConfig = field(default_factory=fit_router_spec)
    loop: LoopConfig = field(default_factory=fit_loop)  # batch_size: cached rows per step


def cached_router(spec: RouterConfig, vocab_size: int, k: int, full_rows: bool = False) -> RouterConfig:
    """``spec`` at the cache's shape: a top-K router over both models' top-``k`` at the cache's vocabulary, or a
    full-logits router (``kind="full"``) when the cache kept the full rows (``features --full-rows``)."""
    if spec.kind == "full":
        if not full_rows:
            raise TrainingSetupError("a full-logits router needs the full log-prob rows in the cache: build it with "
                                     "`python -m router_training features ... --full-rows`")
        return sized(spec, vocab_size).model_copy(update={"k": k, "source": "both", "embed_dim": 0})
    if spec.source != "both":
        raise TrainingSetupError(f"the feature cache trains a topk router on both models' top-K, not source "
                                 f"{spec.source!r}")
    return sized(spec, vocab_size).model_copy(update={"k": k})


@dataclass
class FitResult:
    router: Router
    checkpoint: Path
    report: dict[str, Any] = field(default_factory=dict)


def split_groups(groups: list[str], frac: float, seed: int) -> set[str]:
    uniq = sorted(set(groups))
    random.Random(seed).shuffle(uniq)
    return set(uniq[: max(1, round(frac * len(uniq)))]) if frac > 0 and len(uniq) > 1 else set()


def load_general(path: str, meta: dict) -> tuple[dict[str, torch.Tensor], list[str]]:
    """The general cache's rows, refused unless it was built from the same models and router shape as ``meta``."""
    rows, gmeta = fc.load(Path(path))
    for key in ("base_model", "reward_model", "tokenizer_fingerprint", "vocab_size"):
        if gmeta.get(key) != meta.get(key):
            raise TrainingSetupError(f"general cache {path}: its {key} is {gmeta.get(key)!r}, the cache's "
                                     f"{meta.get(key)!r}; build both caches from the same models")
    for key in ("k", "full_rows"):
        if gmeta["config"].get(key, False) != meta["config"].get(key, False):
            raise TrainingSetupError(f"general cache {path}: its {key} is {gmeta['config'].get(key, False)!r}, the "
                                     f"cache's {meta['config'].get(key, False)!r}; build both caches alike")
    return rows, gmeta["groups"]


def split_general(rows: dict[str, torch.Tensor], groups: list[str], frac: float,
                  seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """(train, validation) rows of the general cache, split by prompt like the main cache by problem."""
    held = split_groups(groups, frac, seed)
    is_val = torch.tensor([groups[int(q)] in held for q in rows["seq"]], dtype=torch.bool)
    return fc.select(rows, ~is_val), fc.select(rows, is_val)


def router_alpha(router: Router, rows: dict[str, torch.Tensor]) -> torch.Tensor:
    if isinstance(router, FullRouter):
        return router.forward_logprobs(rows["lpf_base"], rows["lpf_reward"]).float()
    return router.forward_features(fc.topk_features(rows)).float()


def weights(rows: dict[str, torch.Tensor], js: float, other: float) -> torch.Tensor:
    return torch.where(fc.informative(rows, js), 1.0, other)


def mix_preference(router: Router, rows: dict[str, torch.Tensor], beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Preference on the mix over the pairs present in ``rows``: (loss, accuracy)."""
    lp = -fc.cached_nll(rows, router_alpha(router, rows))
    pairs, inv = torch.unique(rows["pair"], return_inverse=True)
    summed = torch.zeros(len(pairs), 2).index_put_((inv, rows["side"]), lp, accumulate=True)
    return pair_loss(summed[:, 0], summed[:, 1], beta), (summed[:, 0] > summed[:, 1]).float().mean()


def by_class(a: torch.Tensor, rows: dict[str, torch.Tensor]) -> dict[str, dict[str, float | int]]:
    return {c: {"mean_a": float(a[rows["cls"] == i].mean()), "rows": int((rows["cls"] == i).sum())}
            for i, c in enumerate(fc.CLASSES) if (rows["cls"] == i).any()}


@torch.no_grad()
def evaluate(router: Router, rows: dict[str, torch.Tensor], pref_rows: dict[str, torch.Tensor] | None,
             cfg: FitConfig, js: float, general_rows: dict[str, torch.Tensor] | None = None) -> dict[str, Any]:
    router.eval()
    a = router_alpha(router, rows)
    info = fc.informative(rows, js)
    w = torch.where(info, 1.0, cfg.other_weight)
    nll = fc.cached_nll(rows, a)
    grid = torch.stack([fc.cached_nll(rows, g) for g in GRID], dim=1)  # [N, G]
    fixed_info = grid[info].mean(0)
    best = int(fixed_info.argmin())
    oracle_info = float(grid[info].min(1).values.mean())
    out: dict[str, Any] = {
        "rows": int(nll.numel()), "informative_rows": int(info.sum()),
        "nll": float(nll.mean()), "weighted_nll": float((w * nll).sum() / w.sum()),
        "nll_informative": float(nll[info].mean()), "mean_a": float(a.mean()),
        "fixed_a_nll_informative": {f"{g:.2f}": float(v) for g, v in zip(GRID, fixed_info)},
        "best_fixed_a": GRID[best], "best_fixed_nll_informative": float(fixed_info[best]),
        "base_nll_informative": float(fixed_info[0]), "oracle_nll_informative": oracle_info,
    }
    gap = out["best_fixed_nll_informative"] - oracle_info
    out["oracle_gain_over_best_fixed"] = gap / max(1e-9, out["best_fixed_nll_informative"])
    out["router_gap_closed"] = (out["best_fixed_nll_informative"] - out["nll_informative"]) / gap if gap > 0 else 0.0
    out["a_by_class"] = by_class(a, rows)
    if general_rows is not None and general_rows["targets"].numel():
        ga = router_alpha(router, general_rows)
        out["general"] = {"rows": int(ga.numel()), "mean_a": float(ga.mean()),
                          "kl": float(fc.cached_kl_to_base(general_rows, ga).mean()),
                          "kl_at_best_fixed_a": float(fc.cached_kl_to_base(general_rows, out["best_fixed_a"]).mean()),
                          "a_by_class": by_class(ga, general_rows)}
    if pref_rows is not None and pref_rows["pair"].numel():
        loss, acc = mix_preference(router, pref_rows, cfg.pref_beta)
        out["pref_loss"], out["pref_accuracy"] = float(loss), float(acc)
        base_only = -fc.cached_nll(pref_rows, 0.0)
        pairs, inv = torch.unique(pref_rows["pair"], return_inverse=True)
        s = torch.zeros(len(pairs), 2).index_put_((inv, pref_rows["side"]), base_only, accumulate=True)
        out["pref_accuracy_base"] = float((s[:, 0] > s[:, 1]).float().mean())
    router.train()
    return out


def fit(cfg: FitConfig) -> FitResult:
    t0 = time.time()
    lc = cfg.loop
    if lc.resume or lc.checkpoint_every or lc.stop_after is not None:
        raise TrainingSetupError("a fit on the feature cache has no resumable state: resume, checkpoint_every and "
                                 "stop_after are not supported (it takes seconds; rerun it)")
    runtime.seed_everything(lc.seed)
    rows, meta = fc.load(Path(cfg.cache))
    ccfg = meta["config"]
    js = ccfg["js_threshold"]
    groups = meta["groups"]
    held = split_groups(groups, cfg.val_fraction, lc.seed)
    is_val = torch.tensor([groups[int(s)] in held for s in rows["seq"]])
    is_pair = rows["pair"] >= 0
    train_nll, val_nll = fc.select(rows, ~is_pair & ~is_val), fc.select(rows, ~is_pair & is_val)
    train_pref, val_pref = fc.select(rows, is_pair & ~is_val), fc.select(rows, is_pair & is_val)
    if train_nll["targets"].numel() == 0:
        raise ValueError(f"feature cache {cfg.cache} has no training rows")
    w_train = weights(train_nll, js, cfg.other_weight)
    train_pairs = torch.unique(train_pref["pair"]).tolist()
    rcfg = cached_router(cfg.router, int(meta["vocab_size"]), ccfg["k"], ccfg.get("full_rows", False))
    router = build_router(rcfg)
    router.train()
    out = Path(cfg.out)
    gen = torch.Generator().manual_seed(lc.seed)
    use_pref = cfg.objective == "nll+pref" and train_pairs
    gen_train = gen_val = None
    if cfg.general_cache:
        gen_train, gen_val = split_general(*load_general(cfg.general_cache, meta), cfg.val_fraction, lc.seed)
    evals: list[dict[str, Any]] = []

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = torch.randint(0, train_nll["targets"].numel(), (lc.batch_size,), generator=gen)
        b = {k: v[idx] for k, v in train_nll.items()}
        a = router_alpha(router, b)
        w = w_train[idx]
        nll = (w * fc.cached_nll(b, a)).sum() / w.sum()
        loss = nll
        row = {"weighted_nll": float(nll.detach()), "mean_a": float(a.detach().mean())}
        if gen_train is not None:
            gi = torch.randint(0, gen_train["targets"].numel(), (cfg.general_batch,), generator=gen)
            gb = {k: v[gi] for k, v in gen_train.items()}
            ga = router_alpha(router, gb)
            kl = fc.cached_kl_to_base(gb, ga).mean()
            loss = loss + cfg.general_weight * kl
            row.update(general_kl=float(kl.detach()), general_a=float(ga.detach().mean()))
        if use_pref:
            pick = torch.tensor(random.Random(lc.seed * 7919 + step).sample(train_pairs,
                                                                             min(cfg.pair_batch, len(train_pairs))))
            pl, pacc = mix_preference(router, fc.select(train_pref, torch.isin(train_pref["pair"], pick)),
                                      cfg.pref_beta)
            loss = loss + cfg.pref_weight * pl
            row.update(pref_loss=float(pl.detach()), pref_accuracy=float(pacc))
        return loss, row

    def eval_fn(step: int) -> dict[str, Any]:
        evals.append(evaluate(router, val_nll, val_pref, cfg, js, gen_val))
        return evals[-1]

    # No resumable state to protect: the artefact is saved after the loop.
    run_cfg = configs.flat(replace(cfg, router=rcfg))
    res = loop.run(router, step_fn, eval_fn, lc, out / "train", run_cfg, name="router",
                   desc=f"router fit [{cfg.objective}]",
                   postfix=lambda r: {"nll": f"{r['weighted_nll']:.3f}", "a": f"{r['mean_a']:.2f}"})
    first, last = evals[0], res.eval
    router.eval()
    # config: the fit's own fields, the router's (at the cache's shape) and the loop's, nested as in FitConfig
    own = {f.name: getattr(cfg, f.name) for f in fields(cfg) if f.name not in ("router", "loop")}
    loop_cfg = {k: v for k, v in asdict(lc).items() if k not in NO_STATE_FIELDS | {"progress"}}
    report = {"objective": cfg.objective, "config": {**own, "router": rcfg.model_dump(), "loop": loop_cfg},
              "train_rows": int(train_nll["targets"].numel()), "train_pairs": len(train_pairs),
              "general_train_rows": 0 if gen_train is None else int(gen_train["targets"].numel()),
              "val_groups": len(held), "eval_start": first, "eval": last, "seconds": round(time.time() - t0, 1),
              "gate_c": {"oracle_gain_over_best_fixed": last["oracle_gain_over_best_fixed"],
                         "router_gap_closed": last["router_gap_closed"],
                         "passed": last["oracle_gain_over_best_fixed"] >= 0.03}}
    save_router(out, router, tokenizer_fingerprint=meta.get("tokenizer_fingerprint"),
                base_model=meta.get("base_model"), reward_model=meta.get("reward_model"), training=report)
    (out / "train" / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    runtime.plot_curves(res.rows, out / "train" / "curves.png", f"TARo router ({cfg.objective}, cached)",
                        [("train", ["weighted_nll"]), ("eval", ["nll_informative"]), ("eval", ["mean_a"])])
    return FitResult(router, out, report)
