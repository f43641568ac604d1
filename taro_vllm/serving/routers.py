"""Several routers in one engine, chosen per request (like vLLM's multi-LoRA): names, slots and the grouped step.

    --taro-router CKPT                     one router (named after its folder)
    --taro-router math=CKPT_A --taro-router code=CKPT_B     several; the first is the default
    vllm_xargs {"taro_router": "code"}  or  "model": "code"   picks one per request

Every router of an engine is checked against the engine's base and reward model at start-up (and when loaded at run
time) exactly as the first one is; a router whose checkpoint names another reward model is refused.

* :func:`parse_router_specs` - the ``--taro-router`` values -> ``{name: path}`` (pure).
* :class:`RouterSet` - the engine's routers by slot (slot 0 = the default); rows carry a slot.
* :class:`GroupedRouters` - one step's weight when rows use different routers: each router runs once, on its own
  rows (an index per router, no loop over rows), and the answers are scattered into one ``[N]`` weight.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path

import torch

from taro_vllm.features import RouterWeight

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


def router_name(path: str | Path) -> str:
    """The name of a router given without one: its checkpoint folder's."""
    return Path(str(path).rstrip("/")).name


def served_routers(hf_config) -> dict[str, str]:
    """An engine's routers by name, the default first, from the served model's config (``taro_routers`` when several
    or named, else the one ``taro_router`` under its folder's name)."""
    return dict(getattr(hf_config, "taro_routers", None) or parse_router_specs(getattr(hf_config, "taro_router", None)))


def parse_router_specs(values: list[str] | str | None) -> dict[str, str]:
    """``NAME=CKPT`` or ``CKPT`` values (in order; the first is the default) -> ``{name: path}``; ValueError when a
    name is invalid or repeated. An unnamed router is named after its checkpoint folder."""
    if values is None:
        return {}
    if isinstance(values, str):
        values = [values]
    out: dict[str, str] = {}
    for v in values:
        name, sep, path = v.partition("=")
        if not sep or "/" in name or not NAME.match(name):
            name, path = router_name(v) or "router", v
        if not NAME.match(name):
            raise ValueError(f"--taro-router {v!r}: router names are 1-64 characters of letters, digits, '.', '_' "
                             "and '-' (name it: --taro-router NAME=CKPT)")
        if name in out:
            raise ValueError(f"--taro-router: the name {name!r} is given twice (name them: NAME=CKPT)")
        out[name] = path
    return out


class RouterSet:
    """The routers of one engine by slot. Slots are never reused, so a row admitted with slot s keeps meaning the
    router it was admitted with; an unloaded router's slot is empty (rows still holding it get the default)."""

    def __init__(self, default_name: str, default_router: torch.nn.Module):
        self.modules: list[torch.nn.Module | None] = [default_router]
        self.slot_of: dict[str, int] = {default_name: 0}
        self.paths: dict[str, str] = {}
        self.lock = threading.Lock()

    @property
    def default_name(self) -> str:
        return next(n for n, s in self.slot_of.items() if s == 0)

    def slot(self, name: str | None) -> int:
        """The slot of a router name (None: the default); -1 when no such router is loaded."""
        if name is None:
            return 0
        return self.slot_of.get(name, -1)

    def add(self, name: str, router: torch.nn.Module, path: str = "") -> int:
        with self.lock:
            if name in self.slot_of:
                raise ValueError(f"a router named {name!r} is already loaded")
            self.modules.append(router)
            self.slot_of[name] = len(self.modules) - 1
            self.paths[name] = path
            return self.slot_of[name]

    def remove(self, name: str) -> None:
        with self.lock:
            slot = self.slot_of.get(name)
            if slot is None:
                raise KeyError(name)
            if slot == 0:
                raise ValueError(f"{name!r} is the engine's default router; it cannot be unloaded")
            del self.slot_of[name]
            self.paths.pop(name, None)
            self.modules[slot] = None

    def module(self, slot: int) -> torch.nn.Module:
        m = self.modules[slot] if 0 <= slot < len(self.modules) else None
        return m if m is not None else self.modules[0]

    def names(self) -> list[str]:
        return sorted(self.slot_of, key=self.slot_of.get)


class GroupedRouters:
    """The weight of a step whose rows use several routers (``WeighsRows``, as one router is to the mix).

    ``groups`` is ``[(slot, rows)]`` with ``rows`` a device index tensor; rows in no group get NaN (they are
    overridden rows: the mix uses their override). No per-row statistics are returned, so the mix checks the mixed
    rows for NaN/inf itself.
    """

    def __init__(self, routers: RouterSet, groups: list[tuple[int, torch.Tensor]]):
        self.routers = routers
        self.groups = groups

    def weight(self, z_base: torch.Tensor, z_reward: torch.Tensor) -> RouterWeight:
        alpha = torch.full((z_base.shape[0],), float("nan"), dtype=torch.float32, device=z_base.device)
        for slot, rows in self.groups:
            w = self.routers.module(slot).weight(z_base.index_select(0, rows), z_reward.index_select(0, rows))
            alpha.index_copy_(0, rows, w.alpha.float())
        return RouterWeight(alpha)
