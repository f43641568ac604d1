"""Router checkpoint: a folder with ``config.json`` (typed below) and ``model.safetensors``. Never pickle.

Loading validates everything a serving engine would otherwise trip over later, and every failure names the file and
the fix: a missing folder or file, a pickle, a truncated or corrupt safetensors file, wrong tensor names or shapes,
NaN/inf weights, a vocabulary or tokenizer that differs from the one the caller serves.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from taro_vllm.router import Router, RouterConfig, build_router

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT = "taro-router"
# 2: the routers' inputs are scaled (RouterConfig.input_scale; the full router's row-centred) and a fresh router
#    starts at a = 0.1. Weights trained on format-1 inputs would read inputs 10x smaller / shifted: not loadable.
FORMAT_VERSION = 2
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt")


class CheckpointError(ValueError):
    """A router checkpoint that cannot be served; the message names the file and what to do."""


class RouterCheckpointConfig(BaseModel):
    model_config = ConfigDict(extra="forbid")

    format: Literal["taro-router"] = FORMAT
    format_version: int = FORMAT_VERSION
    router: RouterConfig
    tokenizer_fingerprint: str | None = Field(default=None, description="see tokenizer_fingerprint()")
    base_model: str | None = Field(default=None, description="base model the router was trained with")
    reward_model: str | None = Field(default=None, description="reward model to serve it with (path or name)")
    training: dict[str, Any] = Field(default_factory=dict, description="free-form metadata: steps, data, loss")


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """sha256 over the token->id map and the special tokens; equal iff two tokenizers index the same tokens.

    Accepts a transformers tokenizer or a path to a tokenizer/model directory.
    """
    if isinstance(tokenizer, (str, os.PathLike)):
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    vocab = sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1])
    special = {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())}
    blob = json.dumps({"vocab": vocab, "special": special}, ensure_ascii=False, separators=(",", ":"))
    return "sha256:" + hashlib.sha256(blob.encode()).hexdigest()


def save_router(
    path: str | os.PathLike,
    router: Router,
    *,
    tokenizer_fingerprint: str | None = None,
    base_model: str | None = None,
    reward_model: str | None = None,
    training: dict[str, Any] | None = None,
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` atomically (temp file + rename) so a kill never leaves half."""
    from safetensors.torch import save_file

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    cfg = RouterCheckpointConfig(
        router=router.cfg,
        tokenizer_fingerprint=tokenizer_fingerprint,
        base_model=base_model,
        reward_model=reward_model,
        training=training or {},
    )
    state = {k: v.detach().contiguous().cpu() for k, v in router.state_dict().items()}
    tmp = out / (WEIGHTS_NAME + ".tmp")
    save_file(state, str(tmp), metadata={"format": "pt", "taro_format": FORMAT})
    os.replace(tmp, out / WEIGHTS_NAME)
    tmp_cfg = out / (CONFIG_NAME + ".tmp")
    tmp_cfg.write_text(cfg.model_dump_json(indent=2) + "\n")
    os.replace(tmp_cfg, out / CONFIG_NAME)
    return out


def read_config(path: str | os.PathLike) -> RouterCheckpointConfig:
    ckpt = Path(path)
    if not ckpt.exists():
        raise CheckpointError(f"router checkpoint {ckpt} does not exist; pass the folder written by `taro-vllm train router`")
    if not ckpt.is_dir():
        raise CheckpointError(
            f"router checkpoint {ckpt} is a file; a router checkpoint is a folder with {CONFIG_NAME} and {WEIGHTS_NAME}"
        )
    cfg_file = ckpt / CONFIG_NAME
    if not cfg_file.is_file():
        raise CheckpointError(f"{cfg_file} is missing; a router checkpoint needs {CONFIG_NAME} and {WEIGHTS_NAME}")
    try:
        raw = json.loads(cfg_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{cfg_file} is not valid JSON ({e})") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        raise CheckpointError(f'{cfg_file} is not a TARo router config (expected "format": "{FORMAT}")')
    if raw.get("format_version") == 1:
        raise CheckpointError(
            f"{cfg_file} is a format-1 router checkpoint: the router's input scaling changed in format 2 (log-prob "
            "inputs multiplied by input_scale, the full-logits router's row-centred), so its weights would read "
            "inputs on another scale. The router must be retrained (`taro-vllm train router ...` or "
            "`taro-vllm train fit-router ...`), which writes a format-2 checkpoint."
        )
    if raw.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(
            f"{cfg_file} has format_version {raw.get('format_version')!r}; this taro_vllm reads {FORMAT_VERSION}"
        )
    try:
        return RouterCheckpointConfig.model_validate(raw)
    except ValidationError as e:
        raise CheckpointError(f"{cfg_file} is invalid: {e}") from None


def _check_not_pickle(weights: Path) -> None:
    with open(weights, "rb") as f:
        head = f.read(8)
    # torch.save writes a zip ("PK") or a raw pickle (protocol byte 0x80); safetensors starts with a u64 header size.
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise CheckpointError(
            f"{weights} is a pickle (torch.save) file; pickles can run code on load and are refused. "
            "Re-save the router with taro_vllm.checkpoint.save_router (safetensors)."
        )


def _load_tensors(ckpt: Path) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    weights = ckpt / WEIGHTS_NAME
    if not weights.is_file():
        pickles = sorted(p.name for p in ckpt.iterdir() if p.suffix in _PICKLE_SUFFIXES)
        hint = f" Found {pickles}: pickles are refused; re-save with save_router." if pickles else ""
        raise CheckpointError(f"{weights} is missing.{hint}")
    _check_not_pickle(weights)
    try:
        return load_file(str(weights))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{weights} is truncated or corrupt ({e}); re-save or re-copy the checkpoint") from None


def load_router(
    path: str | os.PathLike,
    *,
    expected_vocab_size: int | None = None,
    expected_tokenizer_fingerprint: str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
    config: RouterCheckpointConfig | None = None,
) -> tuple[Router, RouterCheckpointConfig]:
    """Load and validate a router checkpoint; returns the router in eval mode and its config (``config``: the
    checkpoint's config.json as :func:`read_config` already returned it, so it is not read twice)."""
    ckpt = Path(path)
    cfg = config if config is not None else read_config(ckpt)
    cfg_file = ckpt / CONFIG_NAME
    if expected_vocab_size is not None and cfg.router.vocab_size != expected_vocab_size:
        raise CheckpointError(
            f"{cfg_file}: router vocab_size {cfg.router.vocab_size} != served vocab_size {expected_vocab_size}; "
            "this router was trained for another tokenizer. Train one for this model with `taro-vllm train router`."
        )
    if (
        expected_tokenizer_fingerprint is not None
        and cfg.tokenizer_fingerprint is not None
        and cfg.tokenizer_fingerprint != expected_tokenizer_fingerprint
    ):
        raise CheckpointError(
            f"{cfg_file}: tokenizer fingerprint {cfg.tokenizer_fingerprint[:19]}... does not match the served "
            f"tokenizer ({expected_tokenizer_fingerprint[:19]}...); the router was trained with a different tokenizer."
        )
    tensors = _load_tensors(ckpt)
    weights = ckpt / WEIGHTS_NAME
    router = build_router(cfg.router)
    expected = router.state_dict()
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"{weights} does not match {cfg_file} (router kind={cfg.router.kind}, k={cfg.router.k}): "
            f"missing tensors {missing}, unexpected tensors {unexpected}"
        )
    for name, ref in expected.items():
        t = tensors[name]
        if t.shape != ref.shape:
            raise CheckpointError(
                f"{weights}: tensor {name} has shape {tuple(t.shape)}, but {cfg_file} implies {tuple(ref.shape)} "
                f"(kind={cfg.router.kind}, vocab_size={cfg.router.vocab_size}, k={cfg.router.k}, "
                f"source={cfg.router.source}, embed_dim={cfg.router.embed_dim}, hidden_dim={cfg.router.hidden_dim})"
            )
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{weights}: tensor {name} contains NaN or inf values; the checkpoint is unusable")
    # Keep the stored dtype (bit-exact round trip) unless the caller asks for another.
    first = next(iter(tensors.values()))
    router.to(dtype=dtype or first.dtype)
    router.load_state_dict(tensors, strict=True)
    router.to(device=device).eval()
    return router, cfg
