"""The TARo router on top of a frozen base and a frozen reward model.

Teacher forcing on correct solutions (prompt + reference solution): ONE forward of each model per batch gives the
logits at every position; the scored positions (the solution tokens, prompt masked) are flattened into ``[N, V]``
rows, the router reads them and returns one ``a`` per row, and the loss is the NLL of the reference token under
``log_softmax(mix_reference(z_base, z_reward, a))``. Optionally a preference term on step pairs: the mixed
distribution should give the chosen step a higher summed log-prob than the rejected one.

For comparison, the first evaluation also measures the held-out NLL of fixed mixes (``a`` swept over 0, 0.1, ...,
1; a=0 is the base alone, a=1 the reward model alone; the same forwards) and every evaluation reports the best one.

The models are plain callables ``(input_ids, attention_mask) -> logits [B, T, V]`` (:data:`LogitSource`), so the
same :func:`train_router` runs on HF models (the CLI) and on synthetic logit sources (tests). Its config holds the
router's own ``RouterConfig`` (``router``) and the shared ``LoopConfig`` (``loop``); the steps run through
:func:`router_training.loop.run`, the reward model's loop too.

Output, ``--out DIR``: the router checkpoint (``taro_vllm.checkpoint`` format: ``config.json`` +
``model.safetensors``) plus ``DIR/train/{metrics.jsonl,curves.png,state/}``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch

from router_training import configs, loop, runtime
from router_training.configs import arg
from router_training.data import load_solutions, load_step_pairs, split_by_group
from router_training.encoding import Batch, ExampleConfig, batch_indices, collate
from router_training.errors import DataError, TrainingSetupError
from router_training.loop import LoopConfig
from router_training.losses import pair_loss
from taro_vllm import mix
from taro_vllm.checkpoint import save_router, tokenizer_fingerprint
from taro_vllm.router import Router, RouterConfig, build_router

LogitSource = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Example = tuple[list[int], list[int]]  # (context ids, scored ids)
PairExample = tuple[list[int], list[int], list[int], list[int]]  # (context, chosen, context, rejected)

FIXED_A_GRID = tuple(i / 10 for i in range(11))
VOCAB_FROM_MODELS = 1  # RouterConfig needs a vocab_size > 0; train_router replaces this one with the base's


def router_spec(**kw: Any) -> RouterConfig:
    """A RouterConfig with this trainer's defaults; ``vocab_size`` is filled in by :func:`train_router` from the
    models. ``init_bias`` 0 starts at a = 0.5: this trainer's default from before RouterConfig's a = 0.1 (which the
    cached-feature fit uses), kept so that the recorded recipe runs reproduce."""
    return RouterConfig(**{"vocab_size": VOCAB_FROM_MODELS, "init_bias": 0.0, **kw})


@dataclass
class RouterTrainConfig:
    # model folders (CLI); unused when train_router is given logit sources directly
    base: str = arg("", "base model folder (frozen)", required=True)
    reward: str = arg("", "reward model folder (frozen; same tokenizer)", required=True)
    data: list[str] = arg(factory=list, required=True,
                          help="solutions file: prompt/solution or Math-Step-DPO (full_chosen); repeatable")
    pairs: list[str] = arg(factory=list, help="Math-Step-DPO pairs for the preference term; repeatable")
    out: str = arg("", "output folder (the router checkpoint; logs and state go to OUT/train/)", required=True)
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    pref_weight: float = arg(0.0, "weight of the preference term on the mix (0 = NLL only)")
    pref_beta: float = arg(0.05, "beta of the preference term")
    pref_batch_size: int = arg(2, "pairs per step for the preference term")
    max_eval_examples: int = arg(64, "held-out solutions per evaluation")
    router: RouterConfig = field(default_factory=router_spec)
    loop: LoopConfig = field(default_factory=LoopConfig)


@dataclass
class RouterInputs:
    """Everything the loop needs besides the config; built from model folders by :func:`prepare_inputs`."""

    base: LogitSource
    reward: LogitSource
    vocab_size: int  # the served (base) vocabulary: the router's width; reward logits are cropped/padded to it
    train: Sequence[Example]
    heldout: Sequence[Example]
    pad_id: int = 0
    pairs: Sequence[PairExample] = ()
    device: torch.device = torch.device("cpu")
    tokenizer_fingerprint: str | None = None
    base_model: str | None = None
    reward_model: str | None = None
    data_info: dict[str, Any] = field(default_factory=dict)


@dataclass
class RouterResult:
    router: Router
    checkpoint: Path
    steps: int
    eval: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0
    finished: bool = True


# --- the math ----------------------------------------------------------------------------------------------------

def scored_rows(base: LogitSource, reward: LogitSource, batch: Batch) -> tuple[torch.Tensor, torch.Tensor,
                                                                                  torch.Tensor, torch.Tensor]:
    """One forward per model; the logits that predict scored tokens as rows: (z_base, z_reward, targets, row→seq)."""
    with torch.no_grad():
        zb = base(batch.input_ids, batch.attention_mask)
        zr = mix.align_vocab(reward(batch.input_ids, batch.attention_mask), zb)
    # Logits at t predict token t+1: drop the last position, flatten [B, T-1, V] -> [B*(T-1), V], keep scored rows.
    sel = batch.target_mask[:, 1:].reshape(-1)
    v = zb.shape[-1]
    rows_b = zb[:, :-1].reshape(-1, v)[sel]
    rows_r = zr[:, :-1].reshape(-1, v)[sel]
    targets = batch.input_ids[:, 1:].reshape(-1)[sel]
    seq = torch.arange(batch.input_ids.shape[0], device=sel.device).repeat_interleave(batch.input_ids.shape[1] - 1)
    return rows_b, rows_r, targets, seq[sel]


def mixed_nll(z_base: torch.Tensor, z_reward: torch.Tensor, alpha: torch.Tensor | float,
              targets: torch.Tensor) -> torch.Tensor:
    """Per-row NLL of the target under ``log_softmax(mix_reference(z_base, z_reward, a))``."""
    z = mix.mix_reference(z_base, z_reward, alpha)
    return torch.logsumexp(z, dim=-1) - z.gather(1, targets[:, None]).squeeze(1)


def _router_a(router: Router, zb: torch.Tensor, zr: torch.Tensor) -> torch.Tensor:
    return router(zb, zr).float()


def preference_loss(router: Router, inp: RouterInputs, pairs: Sequence[PairExample], beta: float) -> torch.Tensor:
    """-log sigmoid(beta * (log p_mix(chosen) - log p_mix(rejected))), log-probs summed over each step's tokens."""
    parts = [(cc, c) for cc, c, _, _ in pairs] + [(cr, r) for _, _, cr, r in pairs]
    batch = collate(parts, inp.pad_id).to(inp.device)
    zb, zr, y, seq = scored_rows(inp.base, inp.reward, batch)
    lp = -mixed_nll(zb, zr, _router_a(router, zb, zr), y)
    per_seq = torch.zeros(len(parts), device=lp.device).index_add(0, seq, lp)
    n = len(pairs)
    return pair_loss(per_seq[:n], per_seq[n:], beta)


def _sweep_summary(tot: torch.Tensor, n: int) -> dict[str, Any]:
    nll = (tot / max(1, n)).tolist()
    best = min(range(len(nll)), key=nll.__getitem__)
    return {"best_fixed_a": FIXED_A_GRID[best], "best_fixed_nll": nll[best], "nll_a0_base": nll[0],
            "nll_a1_reward": nll[-1], "fixed_a_nll": dict(zip([f"{a:.1f}" for a in FIXED_A_GRID], nll))}


@torch.no_grad()
def evaluate(router: Router, inp: RouterInputs, examples: Sequence[Example], batch_size: int,
             sweep: bool = False) -> tuple[dict[str, float], dict[str, Any] | None]:
    """Held-out NLL per token of the router's mix; with ``sweep``, also of each fixed a in FIXED_A_GRID (the
    GenARM baseline) from the same forwards. Returns (router metrics, sweep summary or None)."""
    router.eval()
    tot, n, a_sum = 0.0, 0, 0.0
    sweep_tot = torch.zeros(len(FIXED_A_GRID), dtype=torch.float64)
    for i in range(0, len(examples), batch_size):
        batch = collate(list(examples[i: i + batch_size]), inp.pad_id).to(inp.device)
        zb, zr, y, _ = scored_rows(inp.base, inp.reward, batch)
        a = _router_a(router, zb, zr)
        tot += float(mixed_nll(zb, zr, a, y).double().sum())
        a_sum += float(a.double().sum())
        n += int(y.numel())
        if sweep:
            for j, fixed in enumerate(FIXED_A_GRID):
                sweep_tot[j] += float(mixed_nll(zb, zr, fixed, y).double().sum())
    router.train()
    ev = {"nll": tot / max(1, n), "mean_a": a_sum / max(1, n), "tokens": n}
    return ev, (_sweep_summary(sweep_tot, n) if sweep else None)


# --- the trainer (the loop itself is router_training.loop) ----------------------------------------------------------

def sized(spec: RouterConfig, vocab_size: int) -> RouterConfig:
    """``spec`` at the models' vocabulary size (a spec naming another size is refused)."""
    if spec.vocab_size not in (VOCAB_FROM_MODELS, vocab_size):
        raise TrainingSetupError(f"router vocab_size {spec.vocab_size} is not the base model's {vocab_size}")
    return spec.model_copy(update={"vocab_size": vocab_size})


def train_router(cfg: RouterTrainConfig, inp: RouterInputs) -> RouterResult:
    """Train, evaluate against the best fixed a, checkpoint every N steps, resume, save the router checkpoint."""
    t0 = time.time()
    if not inp.train:
        raise DataError("no router training examples")
    out = Path(cfg.out).expanduser()
    lc = cfg.loop
    runtime.seed_everything(lc.seed)
    rcfg = sized(cfg.router, inp.vocab_size)
    router = build_router(rcfg).to(inp.device)
    router.train()
    held = list(inp.heldout)[: cfg.max_eval_examples]
    extra: dict[str, Any] = {"baseline": None}  # the fixed-a sweep, measured once (the first evaluation)

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        idx = batch_indices(len(inp.train), lc.batch_size, step, lc.seed)
        batch = collate([inp.train[i] for i in idx], inp.pad_id).to(inp.device)
        zb, zr, y, _ = scored_rows(inp.base, inp.reward, batch)
        a = _router_a(router, zb, zr)
        nll = mixed_nll(zb, zr, a, y).mean()
        loss = nll
        row = {"nll": float(nll.detach()), "mean_a": float(a.detach().mean())}
        if cfg.pref_weight > 0 and inp.pairs:
            pidx = batch_indices(len(inp.pairs), cfg.pref_batch_size, step, lc.seed + 1)
            pref = preference_loss(router, inp, [inp.pairs[i] for i in pidx], cfg.pref_beta)
            loss = loss + cfg.pref_weight * pref
            row["pref_loss"] = float(pref.detach())
        return loss, row

    def eval_fn(step: int) -> dict[str, Any]:
        if not held:
            return {}
        ev, sweep = evaluate(router, inp, held, lc.batch_size, sweep=extra["baseline"] is None)
        baseline = extra["baseline"] = extra["baseline"] or sweep
        return {**ev, "baseline_best_fixed_nll": baseline["best_fixed_nll"], "best_fixed_a": baseline["best_fixed_a"]}

    def finish(res: loop.LoopResult) -> None:
        train_rows = [r for r in res.rows if r["split"] == "train"]
        tail = train_rows[-max(1, len(train_rows) // 10):]
        summary = {
            "steps": res.steps, "seed": lc.seed, "lr": lc.lr, "batch_size": lc.batch_size,
            "max_len": cfg.examples.max_len, "pref_weight": cfg.pref_weight,
            "train_nll_last10pct": sum(r["nll"] for r in tail) / max(1, len(tail)),
            "heldout": {k: res.eval.get(k) for k in ("nll", "mean_a", "tokens")} if res.eval else None,
            "fixed_a_baseline": extra["baseline"], **inp.data_info,
        }
        router.eval()
        save_router(out, router, tokenizer_fingerprint=inp.tokenizer_fingerprint, base_model=inp.base_model,
                    reward_model=inp.reward_model, training=summary)
        runtime.plot_curves(res.rows, out / "train" / "curves.png", f"TARo router ({rcfg.kind})",
                            [("train", ["nll"]), ("eval", ["nll"]), ("eval", ["mean_a"])])

    run_cfg = configs.run_config(replace(cfg, router=rcfg))
    res = loop.run(router, step_fn, eval_fn, lc, out / "train", run_cfg, name="router", desc=f"router[{rcfg.kind}]",
                   postfix=lambda r: {"nll": f"{r['nll']:.3f}", "a": f"{r['mean_a']:.2f}"}, finish=finish,
                   extra=extra)
    return RouterResult(router, out, res.steps, res.eval, time.time() - t0, res.finished)


# --- from model folders (the CLI) -----------------------------------------------------------------------------------

def hf_logit_source(model) -> LogitSource:
    def logits(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return model(input_ids=input_ids, attention_mask=attention_mask).logits

    return logits


def prepare_inputs(cfg: RouterTrainConfig) -> RouterInputs:
    """Check the two model folders share a tokenizer, load both frozen, encode the data."""
    base_path = runtime.check_model_dir(cfg.base, "base model")
    reward_path = runtime.check_model_dir(cfg.reward, "reward model")
    if not cfg.data:
        raise DataError("no data file given; pass --data FILE (prompt/solution or Math-Step-DPO JSONL/Parquet)")
    solutions = [s for path in cfg.data for s in load_solutions(path)]
    pairs = [p for path in cfg.pairs for p in load_step_pairs(path)]
    tok = runtime.load_tokenizer(base_path)
    fp_base = tokenizer_fingerprint(tok)
    fp_reward = tokenizer_fingerprint(runtime.load_tokenizer(reward_path))
    if fp_base != fp_reward:
        raise TrainingSetupError(
            f"base {base_path} and reward {reward_path} have different tokenizers ({fp_base[:19]}... vs "
            f"{fp_reward[:19]}...); TARo mixes logits token by token, so both must share one tokenizer"
        )
    device, dtype = runtime.pick_device(cfg.loop.device)
    base = runtime.load_causal_lm(base_path, device, dtype).eval().requires_grad_(False)
    reward = runtime.load_causal_lm(reward_path, device, dtype).eval().requires_grad_(False)
    enc = cfg.examples.encoder(tok)
    train, held = split_by_group(solutions, cfg.examples.heldout_fraction, cfg.loop.seed)
    return RouterInputs(
        base=hf_logit_source(base), reward=hf_logit_source(reward), vocab_size=int(base.config.vocab_size),
        train=[enc.solution(s) for s in train], heldout=[enc.solution(s) for s in held], pad_id=enc.pad_id,
        pairs=[enc.pair(p) for p in pairs], device=device, tokenizer_fingerprint=fp_base,
        base_model=str(base_path), reward_model=str(reward_path),
        data_info={"data": [str(Path(d).resolve()) for d in cfg.data],
                   "pairs": [str(Path(p).resolve()) for p in cfg.pairs],
                   "train_examples": len(train), "heldout_examples": len(held),
                   "dtype": str(dtype).removeprefix("torch."), "device": device.type},
    )


def run_router_training(cfg: RouterTrainConfig) -> RouterResult:
    return train_router(cfg, prepare_inputs(cfg))
