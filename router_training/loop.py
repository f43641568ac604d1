"""The one training loop: the reward model, the router and the router on cached features all run :func:`run`.

A trainer brings its math, the loop does the rest the same way for all of them:

* ``step_fn(step) -> (loss, metrics)``: the loss of the ``step``-th batch (0-based; batches are a function of the
  step, so a resumed run draws the same ones) and the numbers to log with it;
* ``eval_fn(step) -> metrics``: the held-out evaluation (``{}``: nothing held out), run at step 0 (not after a
  resume), every ``eval_every`` steps and at the last step; nested dicts are returned but not logged;
* ``finish(result)``: save the artefact; the resumable state is dropped only after it, so a kill in between resumes.

The loop owns: AdamW over the trainable parameters, resume (weights, optimizer and ``extra``, a trainer's own values
that must survive a kill, such as the router's fixed-a baseline), the LR warmup of each step, gradient clipping at 1,
``stop_after``, the non-finite loss guard, tqdm, ``metrics.jsonl``, the eval and checkpoint cadence, and clearing the
state at the end unless ``keep_state``.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from router_training import checkpointing, runtime
from router_training.configs import arg
from router_training.errors import TrainingSetupError

StepFn = Callable[[int], tuple[torch.Tensor, dict[str, Any]]]
EvalFn = Callable[[int], dict[str, Any]]


@dataclass
class LoopConfig:
    """What every training run shares. The defaults suit a small fresh network (the router); the reward model, a
    pretrained LM, takes smaller steps (``reward_trainer.reward_loop``)."""

    lr: float = arg(1e-3, "peak learning rate (AdamW)")
    warmup: int = arg(5, "steps of linear LR warmup, then constant")
    weight_decay: float = arg(0.0, "AdamW weight decay")
    batch_size: int = arg(4, "examples per step")
    max_steps: int = arg(100, "optimizer steps")
    eval_every: int = arg(25, "evaluate every N steps (and at the first and the last)")
    checkpoint_every: int | None = arg(25, "save the resumable state every N steps (0: never)")
    seed: int = arg(0, "seed of the initialisation and of the batch order")
    device: str | None = arg(None, "cuda / cpu (default: cuda if available; bf16 on cuda, fp32 on cpu)")
    resume: bool = arg(False, "continue from OUT/train/state after a kill")
    keep_state: bool = arg(False, "keep the resumable state after finishing")
    progress: bool = arg(True, "progress bar")
    stop_after: int | None = arg(None, argparse.SUPPRESS)  # stop (as if killed) after this many steps: resume tests


@dataclass
class LoopResult:
    steps: int
    eval: dict[str, Any]  # the last evaluation ({} if none ran)
    rows: list[dict[str, Any]] = field(default_factory=list)  # every metrics row of the run, resumed ones included
    finished: bool = True


def run(model: torch.nn.Module, step_fn: StepFn, eval_fn: EvalFn, cfg: LoopConfig, run_dir: Path,
        run_cfg: dict[str, Any], *, name: str, desc: str | None = None,
        postfix: Callable[[dict[str, Any]], dict[str, str]] | None = None,
        finish: Callable[[LoopResult], None] | None = None, extra: dict[str, Any] | None = None) -> LoopResult:
    """Train ``model``'s trainable parameters; ``run_cfg`` (flat) is what a resume must match; ``name`` goes into
    the non-finite loss error, ``desc`` (default ``name``) onto the progress bar."""
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    extra = {} if extra is None else extra
    start = 0
    if cfg.resume and checkpointing.has_state(run_dir):
        meta = checkpointing.load_state(run_dir, model, opt, run_cfg)
        start = meta["step"]
        extra.update(meta["extra"])
    log = runtime.MetricsLog(run_dir / "metrics.jsonl", start if cfg.resume else None)

    def evaluate(step: int) -> dict[str, Any]:
        ev = eval_fn(step)
        if ev:
            log.write({"step": step, "split": "eval", **{k: v for k, v in ev.items() if not isinstance(v, dict)}})
        return ev

    ev = evaluate(0) if start == 0 else {}
    bar = tqdm(total=cfg.max_steps, initial=start, desc=desc or name, disable=not cfg.progress, dynamic_ncols=True)
    step = start
    while step < cfg.max_steps:
        if cfg.stop_after is not None and step - start >= cfg.stop_after:
            bar.close()
            return LoopResult(step, {}, log.rows, finished=False)
        lr = runtime.lr_at(step, cfg.lr, cfg.warmup)
        for g in opt.param_groups:
            g["lr"] = lr
        loss, metrics = step_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        step += 1
        row = {"step": step, "split": "train", "loss": float(loss.detach()), **metrics, "lr": lr,
               "grad_norm": float(grad_norm)}
        if not math.isfinite(row["loss"]):
            raise TrainingSetupError(f"{name} loss became {row['loss']} at step {step}; lower --lr")
        log.write(row)
        bar.update(1)
        if postfix is not None:
            bar.set_postfix(postfix(row))
        if step % cfg.eval_every == 0 or step == cfg.max_steps:
            ev = evaluate(step)
        if cfg.checkpoint_every and step % cfg.checkpoint_every == 0 and step < cfg.max_steps:
            checkpointing.save_state(run_dir, model, opt, step, run_cfg, extra=extra)
    bar.close()
    result = LoopResult(step, ev, log.rows)
    if finish is not None:
        finish(result)
    if not cfg.keep_state:
        checkpointing.clear_state(run_dir)
    return result
