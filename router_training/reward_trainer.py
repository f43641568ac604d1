"""The autoregressive reward model (GenARM): a causal LM whose summed step log-prob is the step's reward.

Loss on a pair with a shared prefix: ``-log sigmoid(beta * (sum log p(chosen | prefix) - sum log p(rejected |
prefix)))``, no reference model. Optionally ``+ nll_weight * mean-token NLL of the chosen step`` (a documented
deviation from GenARM, "DPO + NLL" style): it keeps the reward model's own probability of the right step rising, which
a router trained on the likelihood of the mix needs; ``nll_weight=0`` is pure GenARM.

Full fine-tune or LoRA (merged before saving, so the output is a plain model that vLLM loads). The held-out split
(grouped by problem) reports pairwise accuracy and the mean margin. This module is the math (the loss of a batch,
the evaluation, the saved model); :func:`router_training.loop.run` is the loop (resume, schedule, logs, checkpoints).

Output, ``--out DIR``: the reward model itself (``config.json``, ``model.safetensors``, tokenizer) plus
``DIR/train/{metrics.jsonl,curves.png,state/}``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from router_training import configs, loop, runtime
from router_training.configs import arg
from router_training.data import StepPair, load_step_pairs, split_by_group
from router_training.encoding import Batch, Encoder, ExampleConfig, batch_indices, collate, scored_logprobs
from router_training.errors import DataError, TrainingSetupError
from router_training.loop import LoopConfig
from router_training.losses import pair_loss

LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def reward_loop(**kw: Any) -> LoopConfig:
    """The reward model's loop defaults: a pretrained LM takes small steps (lr 1e-5, 10 warmup steps)."""
    return LoopConfig(**{"lr": 1e-5, "warmup": 10, **kw})


@dataclass
class RewardTrainConfig:
    model: str = arg(help="causal LM folder to start from (default: SmolLM2-135M-Instruct, built offline)",
                     required=False)
    data: list[str] = arg(help="Math-Step-DPO file (JSONL / Parquet); repeatable")
    out: str = arg(help="output folder (the reward model; logs and state go to OUT/train/)")
    beta: float = arg(0.05, "GenARM's beta")
    nll_weight: float = arg(0.0, "+ this x mean-token NLL of the chosen step (0 = pure GenARM)")
    lora: bool = arg(False, "train LoRA adapters (merged into the saved model)")
    lora_r: int = arg(16, "LoRA rank")
    lora_alpha: int = arg(32, "LoRA alpha")
    # adapters on the top N layers only: backward stops there (CPU budget)
    lora_last_layers: int | None = arg(None, "LoRA on the top N layers only (a cheaper backward)")
    examples: ExampleConfig = field(default_factory=ExampleConfig)
    max_eval_pairs: int = arg(256, "held-out pairs per evaluation")
    max_train_pairs: int | None = arg(None, "train on the first N pairs only")
    loop: LoopConfig = field(default_factory=reward_loop)  # batch_size: pairs per step (2x sequences in one forward)


@dataclass
class RewardResult:
    model_dir: Path
    steps: int
    eval: dict[str, float] = field(default_factory=dict)
    seconds: float = 0.0
    finished: bool = True


def pair_logps(model, enc: Encoder, pairs: list[StepPair], device,
               with_counts: bool = False) -> tuple[torch.Tensor, ...]:
    """Summed step log-probs of chosen and rejected: ONE forward over the 2B sequences (and, ``with_counts``, the
    number of tokens of each chosen step)."""
    encoded = [enc.pair(p) for p in pairs]
    parts = [(cc, c) for cc, c, _, _ in encoded] + [(cr, r) for _, _, cr, r in encoded]
    batch: Batch = collate(parts, enc.pad_id).to(device)
    # Only positions whose logits predict a scored token (in any row) go through the LM head: the prompt is most of
    # each sequence, and the [B, T, V] head output and its log-softmax dominate memory (and time for small models).
    keep = batch.target_mask[:, 1:].any(0).nonzero().squeeze(1)
    logits = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, logits_to_keep=keep).logits
    mask = batch.target_mask[:, keep + 1]
    lp = scored_logprobs(logits, batch.input_ids[:, keep + 1], mask).sum(-1)
    n = len(pairs)
    if with_counts:
        return lp[:n], lp[n:], mask[:n].sum(-1)
    return lp[:n], lp[n:]


@torch.no_grad()
def evaluate(model, enc: Encoder, pairs: list[StepPair], beta: float, batch_size: int, device) -> dict[str, float]:
    was_training = model.training
    model.eval()
    chosen, rejected = [], []
    for i in range(0, len(pairs), batch_size):
        c, r = pair_logps(model, enc, pairs[i: i + batch_size], device)
        chosen.append(c.float().cpu())
        rejected.append(r.float().cpu())
    model.train(was_training)
    c, r = torch.cat(chosen), torch.cat(rejected)
    m = c - r
    return {"pairwise_accuracy": float((m > 0).float().mean()), "margin": float(m.mean()),
            "loss": float(pair_loss(c, r, beta)), "pairs": len(pairs)}


def _load_pairs(cfg: RewardTrainConfig) -> tuple[list[StepPair], list[StepPair]]:
    if not cfg.data:
        raise DataError("no data file given; pass --data FILE (Math-Step-DPO JSONL or Parquet)")
    pairs = [p for path in cfg.data for p in load_step_pairs(path)]
    train, held = split_by_group(pairs, cfg.examples.heldout_fraction, cfg.loop.seed)
    if not train:
        raise DataError(f"no training pairs left after holding out {cfg.examples.heldout_fraction:.0%} of the "
                        "problems")
    if cfg.max_train_pairs:
        train = train[: cfg.max_train_pairs]
    return train, held[: cfg.max_eval_pairs]


def _wrap_lora(model, cfg: RewardTrainConfig):
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise TrainingSetupError("--lora needs peft: pip install 'taro-vllm[train]'") from None
    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    targets = [t for t in LORA_TARGETS if t in names]
    layers = None
    if cfg.lora_last_layers:
        n = model.config.num_hidden_layers
        layers = list(range(max(0, n - cfg.lora_last_layers), n))
    # lora_dropout=0: dropout would make the run depend on RNG state that the checkpoint does not carry.
    return get_peft_model(model, LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0,
                                            target_modules=targets, layers_to_transform=layers,
                                            task_type="CAUSAL_LM"))


def train_reward(cfg: RewardTrainConfig) -> RewardResult:
    t0 = time.time()
    out = Path(cfg.out).expanduser()
    model_path = runtime.check_model_dir(cfg.model, "reward model start point")
    train_pairs, held = _load_pairs(cfg)
    device, dtype = runtime.pick_device(cfg.loop.device)
    runtime.seed_everything(cfg.loop.seed)
    tok = runtime.load_tokenizer(model_path)
    enc = cfg.examples.encoder(tok)
    model = runtime.load_causal_lm(model_path, device, dtype)
    model.config.use_cache = False
    if cfg.lora:
        model = _wrap_lora(model, cfg)
    model.train()
    batch_size, seed = cfg.loop.batch_size, cfg.loop.seed

    def step_fn(step: int) -> tuple[torch.Tensor, dict[str, float]]:
        batch = [train_pairs[i] for i in batch_indices(len(train_pairs), batch_size, step, seed)]
        lp_c, lp_r, n_c = pair_logps(model, enc, batch, device, with_counts=True)
        loss = pair_loss(lp_c, lp_r, cfg.beta)
        nll = -(lp_c.sum() / n_c.sum().clamp(min=1))
        if cfg.nll_weight:
            loss = loss + cfg.nll_weight * nll
        margin = (lp_c - lp_r).detach()
        return loss, {"margin": float(margin.mean()), "pairwise_accuracy": float((margin > 0).float().mean()),
                      "chosen_nll": float(nll.detach())}

    def eval_fn(step: int) -> dict[str, float]:
        return evaluate(model, enc, held, cfg.beta, batch_size, device) if held else {}

    def finish(res: loop.LoopResult) -> None:
        _save_model(model, tok, out, cfg.lora)
        runtime.plot_curves(res.rows, out / "train" / "curves.png", "reward model (GenARM)",
                            [("train", ["loss", "pairwise_accuracy"]), ("eval", ["loss", "pairwise_accuracy"])])

    res = loop.run(model, step_fn, eval_fn, cfg.loop, out / "train", configs.run_config(cfg), name="reward",
                   postfix=lambda r: {"loss": f"{r['loss']:.3f}", "margin": f"{r['margin']:.2f}"}, finish=finish)
    return RewardResult(out, res.steps, res.eval, time.time() - t0, res.finished)


def _save_model(model, tok, out: Path, lora: bool) -> None:
    if lora:
        model = model.merge_and_unload()  # a plain model: vLLM cannot serve unmerged adapters of a reward model
    model.config.use_cache = True
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))


def trained_weights(model_dir: str | Path) -> dict[str, torch.Tensor]:
    """The saved reward model's tensors (what the resume test compares)."""
    from safetensors.torch import load_file

    return load_file(str(Path(model_dir) / "model.safetensors"))
