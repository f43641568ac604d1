"""What both training loops share: device + dtype choice, model loading, the LR schedule, metrics JSONL, the PNG."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from router_training.errors import TrainingSetupError
from taro_vllm import envs

envs.set_offline()


def pick_device(device: str | None) -> tuple[torch.device, torch.dtype]:
    """bf16 on CUDA (memory and speed), fp32 on CPU (CPU bf16 matmuls are slow and lossy on most hosts)."""
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    return dev, (torch.bfloat16 if dev.type == "cuda" else torch.float32)


def seed_everything(seed: int) -> None:
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)


def check_model_dir(path: str | Path, what: str) -> Path:
    p = Path(path).expanduser()
    if not (p / "config.json").is_file():
        raise TrainingSetupError(f"{what} {p} is not a Hugging Face model folder (no config.json)")
    return p.resolve()


def load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as e:
        raise TrainingSetupError(
            f"cannot load the tokenizer of {path} ({e}); the model folder needs its tokenizer files"
        ) from None


def load_causal_lm(path: Path, device: torch.device, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype)
    return model.to(device)


def lr_at(step: int, lr: float, warmup: int) -> float:
    """Linear warmup, then constant: a function of the step only, so there is no scheduler state to resume."""
    return lr * min(1.0, (step + 1) / max(1, warmup))


class MetricsLog:
    """Append-only JSONL; on resume, rows after the resumed step are dropped (they belong to the killed tail)."""

    def __init__(self, path: Path, resume_step: int | None):
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        rows: list[dict[str, Any]] = []
        if resume_step is not None and path.exists():
            rows = [r for r in self.read(path) if r.get("step", 0) <= resume_step]
        with open(path, "w") as f:
            for r in rows:
                f.write(json.dumps(r) + "\n")
        self.rows = rows

    @staticmethod
    def read(path: Path) -> list[dict[str, Any]]:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]

    def write(self, row: dict[str, Any]) -> None:
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def plot_curves(rows: list[dict[str, Any]], out: Path, title: str, panels: list[tuple[str, list[str]]]) -> Path:
    """One panel per (split, metric names): a line per metric over steps; dashed hlines for ``baseline_*<metric>``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 3.6), squeeze=False)
    for ax, (split, keys) in zip(axes[0], panels):
        sel = [r for r in rows if r.get("split") == split]
        for k in keys:
            pts = [(r["step"], r[k]) for r in sel if k in r and r[k] is not None]
            if pts:
                ax.plot(*zip(*pts), marker="." if split != "train" else None, label=k)
        for k, v in (sel[-1].items() if sel else []):
            # a baseline ("baseline_best_fixed_nll") belongs on the panel of its metric only
            if k.startswith("baseline_") and any(m in k for m in keys) and isinstance(v, (int, float)):
                ax.axhline(v, ls="--", c="gray", label=k)
        ax.set_title(f"{split}")
        ax.set_xlabel("step")
        ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(out, dpi=90)
    plt.close(fig)
    return out
