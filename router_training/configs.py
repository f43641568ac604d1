"""Trainer configs are dataclasses that nest others (a :class:`~router_training.loop.LoopConfig`, a
``taro_vllm`` ``RouterConfig``); this module gives their flat views, so each default and help text lives on its field:

* :func:`add_flags`: one ``--field-name`` per leaf field (bools as flags: ``--name``, or ``--no-name`` when the
  default is True; lists repeatable; Literals as choices), default and help from the field;
* :func:`build`: the config back from flat values (an argparse namespace), nested defaults kept;
* :func:`flat`: the flat dict a resumable state records, compared key by key on resume
  (``checkpointing.RESUMABLE_KEYS`` names leaf fields).
"""

from __future__ import annotations

import argparse
import dataclasses
import types
from collections.abc import Iterator
from typing import Any, Literal, Union, get_args, get_origin, get_type_hints

from pydantic import BaseModel, ValidationError

from router_training.errors import TrainingSetupError

MISSING = dataclasses.MISSING


def arg(default: Any = MISSING, help: str | None = None, *, factory: Any = MISSING, required: bool | None = None):
    """A dataclass field with its command-line help; ``required`` overrides "required iff no default" for the CLI."""
    meta = {"help": help} if required is None else {"help": help, "required": required}
    return dataclasses.field(default=default, default_factory=factory, metadata=meta)


@dataclasses.dataclass(frozen=True)
class Leaf:
    name: str
    type: Any
    default: Any  # MISSING: none
    help: str | None
    required: bool


def _is_config(tp: Any) -> bool:
    return dataclasses.is_dataclass(tp) or (isinstance(tp, type) and issubclass(tp, BaseModel))


def leaves(cls: type, inst: Any = None) -> Iterator[Leaf]:
    """The leaf fields of ``cls``, nested configs flattened; defaults from ``inst`` (a nested field's default) if
    given."""
    if issubclass(cls, BaseModel):
        for name, info in cls.model_fields.items():
            default = getattr(inst, name) if inst is not None else (MISSING if info.is_required() else info.default)
            yield Leaf(name, info.annotation, default, info.description, default is MISSING)
        return
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if inst is not None:
            default = getattr(inst, f.name)
        elif f.default_factory is not MISSING:
            default = f.default_factory()
        else:
            default = f.default
        if _is_config(hints[f.name]):
            yield from leaves(hints[f.name], default)
        else:
            yield Leaf(f.name, hints[f.name], default, f.metadata.get("help"),
                       f.metadata.get("required", default is MISSING))


def _unwrap_optional(tp: Any) -> Any:
    if get_origin(tp) in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def add_flags(parser: argparse.ArgumentParser, cls: type, aliases: dict[str, list[str]] | None = None,
              skip: frozenset[str] | set[str] = frozenset(), helps: dict[str, str] | None = None) -> None:
    """One option per leaf field of ``cls`` (except ``skip``); ``aliases``: extra spellings of a field's flag;
    ``helps``: help for fields of a class this project does not own (taro_vllm's RouterConfig)."""
    for leaf in leaves(cls):
        if leaf.name in skip:
            continue
        flag = "--" + leaf.name.replace("_", "-")
        extra = list((aliases or {}).get(leaf.name, ()))
        tp = _unwrap_optional(leaf.type)
        help_text = ((helps or {}).get(leaf.name) or leaf.help or "").replace("%", "%%")
        kw: dict[str, Any] = {"dest": leaf.name}
        if tp is bool:
            if leaf.default:
                flag, kw["action"], help_text = "--no-" + flag[2:], "store_false", f"turn off: {help_text}"
            else:
                kw["action"] = "store_true"
            kw["default"] = bool(leaf.default)
        else:
            if get_origin(tp) is list:
                kw.update(action="append", type=get_args(tp)[0])
            elif get_origin(tp) is Literal:
                kw.update(choices=list(get_args(tp)), type=type(get_args(tp)[0]))
            else:
                kw["type"] = tp
            if leaf.required:
                kw["required"] = True
            else:
                default = None if leaf.default is MISSING else leaf.default
                kw["default"] = list(default) if isinstance(default, list) else default
                if default is not None and default != [] and help_text != argparse.SUPPRESS:
                    help_text = f"{help_text} (default: {default})" if help_text else f"default: {default}"
        parser.add_argument(flag, *extra, help=help_text or None, **kw)


def build(cls: type, values: dict[str, Any], inst: Any = None) -> Any:
    """``cls`` from flat ``values`` (leaf name -> value; others ignored); absent leaves keep their defaults."""
    if issubclass(cls, BaseModel):
        data = {**(inst.model_dump() if inst is not None else {}),
                **{k: values[k] for k in cls.model_fields if k in values}}
        try:
            return cls(**data)
        except ValidationError as e:  # e.g. --k 0: a one-line refusal, like every other bad setting
            why = "; ".join(f"{'.'.join(map(str, err['loc']))}: {err['msg']}" for err in e.errors())
            raise TrainingSetupError(f"invalid {cls.__name__}: {why}") from None
    hints = get_type_hints(cls)
    kw: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if _is_config(hints[f.name]):
            sub = getattr(inst, f.name) if inst is not None else f.default_factory()
            kw[f.name] = build(hints[f.name], values, sub)
        elif f.name in values:
            kw[f.name] = values[f.name]
        elif inst is not None:
            kw[f.name] = getattr(inst, f.name)
    return cls(**kw)


def flat(cfg: Any) -> dict[str, Any]:
    """Every leaf field of ``cfg`` by name (nested configs flattened; leaf names are unique across them)."""
    items = (cfg.model_dump().items() if isinstance(cfg, BaseModel)
             else ((f.name, getattr(cfg, f.name)) for f in dataclasses.fields(cfg)))
    out: dict[str, Any] = {}
    for k, v in items:
        sub = flat(v) if _is_config(type(v)) else {k: v}
        clash = out.keys() & sub.keys()
        assert not clash, f"{type(cfg).__name__}: field(s) {sorted(clash)} appear twice once flattened"
        out.update(sub)
    return out


def run_config(cfg: Any) -> dict[str, Any]:
    """What a resumed run must match: every leaf field but where the run writes and which device it runs on."""
    return {k: v for k, v in flat(cfg).items() if k not in ("out", "device")}
