"""The router ``taro-vllm demo`` serves, picked from the asset cache, and the untrained base-as-reward router that
serves any base alone (on-policy sampling).

Sits above :mod:`taro_vllm.assets` (the cache folders), :mod:`taro_vllm.router` and :mod:`taro_vllm.checkpoint` (an
untrained router is built and saved when no trained one can be served), so that assets stays at the bottom.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

from taro_vllm.assets import cache_dir
from taro_vllm.checkpoint import CheckpointError, read_config, save_router, tokenizer_fingerprint
from taro_vllm.router import RouterConfig, build_router


def demo_router(base: Path) -> Path:
    """The router the demo serves: the TAWP recipe's val-selected router if it has been run
    (``runs/smollm2-tawp/router``), else the older GSM recipe's (``runs/smollm2/router``), else an untrained one (a =
    0.1 on every token, a fresh router's start) with SmolLM2 itself as the reward model.  A router checkpoint of an
    older format is not served: the trained one is skipped with a warning (retrain it), the untrained one is
    rebuilt."""
    for trained in (cache_dir() / "runs" / "smollm2-tawp" / "router", cache_dir() / "runs" / "smollm2" / "router"):
        if not (trained / "config.json").is_file():
            continue
        try:
            read_config(trained)
            return trained
        except CheckpointError as e:
            warnings.warn(f"not serving the trained demo router: {e}", stacklevel=2)
    return untrained_router(base, "smollm2-untrained",
                            note="untrained demo router (a = 0.1); run the SmolLM2 recipe")


def untrained_router(base: Path, name: str | None = None, note: str = "untrained router (a = 0.1)") -> Path:
    """A fresh router for ``base`` with the base itself as the reward model (a = 0.1 on every token), saved once per
    base under ``<cache>/routers/``: what serves the base alone (``taro_mode=base``, e.g. on-policy sampling) for any
    base, not only the demo's. An older-format or other-base checkpoint under that name is rebuilt."""
    # The tokenizer is loaded for the fingerprint only when the name needs it or a router is built (demo start-up).
    fingerprint = None if name else tokenizer_fingerprint(base)
    dest = cache_dir() / "routers" / (name or f"untrained-{base.name}-{fingerprint.split(':')[-1][:12]}")
    if (dest / "config.json").is_file():
        try:
            if read_config(dest).base_model == str(base):
                return dest
        except CheckpointError:
            pass  # an older format: rebuilt below
    cfg = json.loads((base / "config.json").read_text())
    router = build_router(RouterConfig(vocab_size=cfg["vocab_size"]))
    save_router(dest, router, tokenizer_fingerprint=fingerprint or tokenizer_fingerprint(base), base_model=str(base),
                reward_model=str(base), training={"note": note})
    return dest
