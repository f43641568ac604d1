"""Resumable training state without pickle: trainable weights and optimizer tensors in safetensors, scalars in JSON.

Layout of ``<run>/state/``::

    weights.safetensors     trainable parameters only (LoRA adapters, or the whole model for a full fine-tune)
    optimizer.safetensors   every tensor of ``optimizer.state_dict()["state"]``, keyed ``<param index>.<name>``
    state.json              step, optimizer param_groups and non-tensor state, the run config (to refuse a resume
                            with different settings), the RNG-free data position (batches are a function of the step)

Written to ``state.tmp/`` and renamed, so a kill at any point of a save leaves a complete state to resume from:
``state/`` whenever it exists (it only ever appears by renaming a complete ``state.tmp/``), else ``state.old/`` (the
previous state, moved aside just before the rename). Leftovers of a killed save or clear (``state.tmp/``, a stale or
half-deleted ``state.old/``, ``state.trash/``) are tidied at the start of the next save.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from router_training.errors import TrainingSetupError

STATE_DIR = "state"


def _flatten_optimizer(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    sd = opt.state_dict()
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for idx, st in sd["state"].items():
        for name, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{name}"] = v.detach().contiguous().cpu()
            else:
                scalars.setdefault(str(idx), {})[name] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _unflatten_optimizer(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    state: dict[int, dict[str, Any]] = {}
    for key, t in tensors.items():
        idx, name = key.split(".", 1)
        state.setdefault(int(idx), {})[name] = t
    for idx, sc in meta.get("scalars", {}).items():
        state.setdefault(int(idx), {}).update(sc)
    return {"state": state, "param_groups": meta["param_groups"]}


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().contiguous().cpu() for n, p in model.named_parameters() if p.requires_grad}


def _recover(run_dir: Path) -> None:
    """Bring a run dir left by a killed save/clear back to "``state/`` is the latest complete state", if any."""
    final, old = run_dir / STATE_DIR, run_dir / (STATE_DIR + ".old")
    if not final.exists() and (old / "state.json").is_file():
        os.replace(old, final)  # killed between the two renames of save_state: the previous state is complete


def save_state(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int,
               config: dict[str, Any], extra: dict[str, Any] | None = None) -> Path:
    final = run_dir / STATE_DIR
    tmp = run_dir / (STATE_DIR + ".tmp")
    old = run_dir / (STATE_DIR + ".old")
    _recover(run_dir)
    # Anything but state/ is now a leftover: a half-written state.tmp, a state.old (complete, or half-deleted by a
    # kill during the rmtree below) that state/ supersedes, the remains of a killed clear_state.
    for leftover in (old, tmp, run_dir / (STATE_DIR + ".trash")):
        if leftover.exists():
            shutil.rmtree(leftover)
    tmp.mkdir(parents=True)
    weights = trainable_state(model)
    # Tied weights share storage; safetensors refuses shared tensors, so store private copies.
    save_file({k: v.clone() for k, v in weights.items()}, str(tmp / "weights.safetensors"))
    opt_tensors, opt_meta = _flatten_optimizer(opt)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    meta = {"step": step, "optimizer": opt_meta, "config": config, "extra": extra or {}}
    (tmp / "state.json").write_text(json.dumps(meta, indent=1) + "\n")
    if final.exists():
        os.replace(final, old)  # old does not exist (removed above), so this rename cannot fail on a non-empty dir
    os.replace(tmp, final)
    if old.exists():
        shutil.rmtree(old)
    return final


def has_state(run_dir: Path) -> bool:
    _recover(run_dir)
    return (run_dir / STATE_DIR / "state.json").is_file()


# Settings that may change between a killed run and its resume; everything else must match.
RESUMABLE_KEYS = frozenset({"resume", "max_steps", "stop_after", "progress", "keep_state", "checkpoint_every"})


def load_state(run_dir: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, config: dict[str, Any]) -> dict:
    """Restore weights + optimizer in place; returns the saved metadata (``step``, ``extra``)."""
    d = run_dir / STATE_DIR
    try:
        meta = json.loads((d / "state.json").read_text())
        if not isinstance(meta, dict) or not isinstance(meta.get("step"), int) or "optimizer" not in meta:
            raise ValueError("missing 'step' or 'optimizer'")
    except (OSError, ValueError) as e:
        raise TrainingSetupError(f"cannot resume: {d / 'state.json'} is corrupt ({e}); "
                                 f"delete {d} to start over, or resume from a copy") from None
    saved = meta.get("config", {})
    diff = sorted(k for k in set(saved) | set(config)
                  if k not in RESUMABLE_KEYS and saved.get(k) != config.get(k))
    if diff:
        details = ", ".join(f"{k}: {saved.get(k)!r} -> {config.get(k)!r}" for k in diff)
        raise TrainingSetupError(f"cannot resume {d}: settings differ from the interrupted run ({details}); "
                                 "use the same settings or a new --out")
    weights = _load_tensors(d / "weights.safetensors")
    params = dict(model.named_parameters())
    missing = sorted(n for n, p in params.items() if p.requires_grad and n not in weights)
    if missing or set(weights) - set(params):
        raise TrainingSetupError(f"cannot resume {d}: saved weights do not match the model (missing {missing[:5]})")
    bad = sorted(n for n, t in weights.items() if t.is_floating_point() and not bool(torch.isfinite(t).all()))
    if bad:
        raise TrainingSetupError(f"cannot resume {d}: weights.safetensors holds NaN/inf in {bad[:5]}")
    opt_tensors = _load_tensors(d / "optimizer.safetensors")
    with torch.no_grad():
        for n, t in weights.items():
            params[n].copy_(t.to(params[n].dtype))
    try:
        opt.load_state_dict(_unflatten_optimizer(opt_tensors, meta["optimizer"]))
    except (KeyError, ValueError, TypeError) as e:
        raise TrainingSetupError(f"cannot resume {d}: optimizer state does not match ({e})") from None
    return meta


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """safetensors only (never pickle); a missing or truncated file is a refusal, not a traceback."""
    from safetensors import SafetensorError

    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:  # as taro_vllm.checkpoint._load_tensors
        raise TrainingSetupError(f"cannot resume: {path} is missing or corrupt ({e}); "
                                 f"delete {path.parent} to start over") from None


def clear_state(run_dir: Path) -> None:
    # state.old and state.tmp first (state/ supersedes them), then state/ renamed aside before it is deleted: a kill
    # at any point leaves either the whole state/ or none of it, never a half-deleted one that looks resumable.
    for name in (STATE_DIR + ".old", STATE_DIR + ".tmp", STATE_DIR + ".trash"):
        if (run_dir / name).exists():
            shutil.rmtree(run_dir / name)
    if (run_dir / STATE_DIR).exists():
        os.replace(run_dir / STATE_DIR, run_dir / (STATE_DIR + ".trash"))
        shutil.rmtree(run_dir / (STATE_DIR + ".trash"))
