"""Check a Hugging Face model folder's files before an engine spends a minute starting on it.

Reads only config.json, index files and safetensors headers (a few KB per file, whatever the model size), so it runs
in milliseconds. Refused, each with a message naming the file: a config.json without the fields every decoder needs,
a pickle named ``*.safetensors``, a safetensors file whose header does not parse or that is shorter than its header
says (truncated copy or download), an index naming a shard that is missing or broken or that lacks a tensor the index
puts there, a folder with no weights. NaN/inf values are checked while the engine loads the weights (serving/model.py).
"""

from __future__ import annotations

import json
import math
import struct
import zipfile
from pathlib import Path

# Fields every decoder-only config needs (vLLM builds the model from them; a missing one silently becomes the
# architecture's default size and fails later as a shape mismatch deep inside the engine), and common aliases.
REQUIRED_FIELDS: dict[str, tuple[str, ...]] = {
    "vocab_size": ("n_vocab", "padded_vocab_size"),
    "hidden_size": ("n_embd", "d_model", "dim"),
    "num_hidden_layers": ("n_layer", "num_layers", "n_layers"),
    "num_attention_heads": ("n_head", "num_heads", "n_heads"),
}
_NESTED_CONFIGS = ("text_config", "llm_config", "language_config")
_DTYPE_BYTES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "F8_E8M0": 1, "I16": 2, "U16": 2,
                "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_MAX_HEADER = 100 * 1024 * 1024  # safetensors' own limit


class ModelFileError(ValueError):
    """A model folder an engine cannot load; the message names the file."""


def check_config(cfg: dict, cfg_path: Path, what: str = "model") -> None:
    """Refuse a config.json that lacks (or has a non-positive) vocab_size, hidden_size, layer or head count."""
    scopes = [cfg] + [cfg[k] for k in _NESTED_CONFIGS if isinstance(cfg.get(k), dict)]
    missing = []
    for field, aliases in REQUIRED_FIELDS.items():
        value = _lookup(scopes, (field, *aliases))
        if value is None:  # only then pay for importing transformers
            value = _lookup(scopes, _transformers_aliases(cfg.get("model_type"), field))
        if value is None:
            missing.append(field)
        elif isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ModelFileError(f"{what} config {cfg_path}: {field} must be a positive integer, got {value!r}")
    if missing:
        raise ModelFileError(f"{what} config {cfg_path} is missing {', '.join(missing)}: an engine cannot build "
                             "the model without it; restore the config.json that came with the weights")


def _lookup(scopes: list[dict], names: tuple[str, ...]):
    return next((s[n] for s in scopes for n in names if s.get(n) is not None), None)


def _transformers_aliases(model_type, field: str) -> tuple[str, ...]:
    """transformers' own attribute_map spelling for this architecture (e.g. GPT-2's n_embd), if it knows it."""
    if not isinstance(model_type, str):
        return ()
    try:
        from transformers import CONFIG_MAPPING

        alias = getattr(CONFIG_MAPPING[model_type], "attribute_map", {}).get(field)
    except Exception:  # transformers missing or the model_type unknown to it: the static aliases only
        return ()
    return (alias,) if alias else ()


def _refuse_pickle(path: Path, head: bytes, what: str) -> None:
    # torch.save writes a zip ("PK") or a raw pickle (protocol byte 0x80); safetensors starts with a u64 header size.
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise ModelFileError(f"{what} file {path} is a pickle (torch.save) file, not safetensors; pickles can run "
                             "code on load and are refused. Convert it to safetensors (safetensors.torch.save_file)")


def safetensors_header(path: Path, what: str = "model") -> dict[str, dict]:
    """The tensor entries of a safetensors file's header, after checking the file holds every byte they describe."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            _refuse_pickle(path, head, what)
            if len(head) < 8:
                raise ModelFileError(f"{what} file {path} is truncated or empty ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise ModelFileError(f"{what} file {path} is truncated or not safetensors: its header claims {n} "
                                     f"bytes, the file has {size}")
            raw = f.read(n)
    except OSError as e:
        raise ModelFileError(f"{what} file {path} cannot be read ({e})") from None
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as e:
        raise ModelFileError(f"{what} file {path} is corrupt: its safetensors header does not parse ({e})") from None
    header.pop("__metadata__", None)
    end = 0
    for name, entry in header.items():
        try:
            begin, stop = (int(x) for x in entry["data_offsets"])
            shape = [int(d) for d in entry["shape"]]
            dtype = entry["dtype"]
        except (KeyError, TypeError, ValueError):
            raise ModelFileError(f"{what} file {path} is corrupt: header entry {name!r} has no valid "
                                 "dtype/shape/data_offsets") from None
        nbytes = _DTYPE_BYTES.get(dtype)
        if stop < begin or (nbytes is not None and stop - begin != math.prod(shape) * nbytes):
            raise ModelFileError(f"{what} file {path} is corrupt: tensor {name} ({dtype} {shape}) has data offsets "
                                 f"[{begin}, {stop}]")
        end = max(end, stop)
    if 8 + n + end > size:
        raise ModelFileError(f"{what} file {path} is truncated: {size} bytes, its header describes {8 + n + end} "
                             f"({8 + n + end - size} missing); re-copy or rebuild the model")
    return header


def check_weights(folder: Path, what: str = "model") -> dict[str, Path]:
    """Check every weight file an engine would load from ``folder``; returns tensor name -> file (safetensors).

    The files vLLM picks: the shards of ``model.safetensors.index.json``, else every ``*.safetensors``, else PyTorch
    ``*.bin``/``*.pt`` files (only checked for a readable zip directory: they are pickles, vLLM loads them with
    ``weights_only``).
    """
    folder = Path(folder)
    files: dict[str, Path] = {}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        return _check_index(index, what)
    shards = sorted(folder.glob("*.safetensors"))
    for shard in shards:
        files.update(dict.fromkeys(safetensors_header(shard, what), shard))
    if shards:
        return files
    pickles = sorted(p for pat in ("*.bin", "*.pt") for p in folder.glob(pat))
    if not pickles:
        raise ModelFileError(f"{what} {folder} has no weights (no *.safetensors, *.bin or *.pt file)")
    for p in pickles:
        with open(p, "rb") as f:
            if f.read(2) != b"PK":
                continue  # a legacy (non-zip) torch.save file: nothing cheap to check
        try:
            with zipfile.ZipFile(p) as z:  # reads the central directory, at the end of the file
                z.infolist()
        except (zipfile.BadZipFile, OSError) as e:
            raise ModelFileError(f"{what} file {p} is truncated or corrupt ({e})") from None
    return files


def _check_index(index: Path, what: str) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        if not isinstance(weight_map, dict) or not weight_map:
            raise ValueError("empty or not an object")
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ModelFileError(f"{what} index {index} is corrupt: no valid weight_map ({e})") from None
    by_shard: dict[str, list[str]] = {}
    for name, shard in weight_map.items():
        by_shard.setdefault(str(shard), []).append(name)
    files: dict[str, Path] = {}
    for shard, names in sorted(by_shard.items()):
        path = index.parent / shard
        if not path.is_file():
            raise ModelFileError(f"{what} shard {path} (named by {index}) does not exist")
        header = safetensors_header(path, what)
        absent = [n for n in names if n not in header]
        if absent:
            raise ModelFileError(f"{what} shard {path} lacks {len(absent)} tensor(s) that {index} puts there "
                                 f"(e.g. {absent[0]})")
        files.update(dict.fromkeys(header, path))
    return files


def check_model_folder(folder: Path, cfg: dict, what: str = "model") -> None:
    """config.json fields and weight files of a Hugging Face model folder (``cfg`` = its parsed config.json)."""
    check_config(cfg, Path(folder) / "config.json", what)
    check_weights(Path(folder), what)


class FiniteWeights:
    """NaN/inf check of weights as an engine loads them: one on-device flag per tensor, read once at the end.

    ``add`` costs one reduction per tensor and no device sync: the sum (accumulated in fp32, fp64 for fp64 weights)
    is non-finite whenever any element is NaN or +-inf. A finite tensor whose sum overflows would be a false alarm,
    so ``raise_if_any`` re-checks each flagged tensor element-wise from its file before refusing.
    """

    def __init__(self) -> None:
        self.names: list[str] = []
        self.flags: list = []

    def add(self, name: str, tensor) -> None:
        import torch

        if not tensor.is_floating_point():
            return
        acc = torch.float64 if tensor.dtype == torch.float64 else torch.float32
        self.names.append(name)
        self.flags.append(torch.isfinite(tensor.sum(dtype=acc)))

    def flagged(self) -> list[str]:
        import torch

        if not self.flags:
            return []
        ok = torch.stack(self.flags).cpu().tolist()  # the one sync
        return [n for n, finite in zip(self.names, ok) if not finite]

    def raise_if_any(self, sources: dict[str, tuple[str, Path, str]], fix: str) -> None:
        """Refuse if a loaded tensor holds NaN/inf; ``sources``: loaded name -> (model label, file, name in file)."""
        for name in self.flagged():
            what, path, name_in_file = sources.get(name, ("model", None, name))
            if path is not None and _all_finite_in_file(path, name_in_file):
                continue  # a finite tensor whose sum overflowed
            where = f"in {path}" if path is not None else "(file unknown)"
            raise ModelFileError(f"{what} weight {name_in_file} {where} contains NaN or inf: the model would "
                                 f"produce NaN logits. Fix or rebuild the file; {fix}")


PRESCAN_MAX_BYTES = 8 * 2**30  # above this, scanning before start costs more than it saves: the load-time check runs


def scan_nonfinite(folder: Path, what: str = "model", max_bytes: int = PRESCAN_MAX_BYTES) -> bool:
    """Refuse a model folder whose safetensors weights hold NaN/inf, before an engine starts (seconds for small
    models: one memory-mapped pass). Returns False, without reading, when the weights exceed ``max_bytes``."""
    import torch
    from safetensors import safe_open

    files = sorted(set(check_weights(Path(folder), what).values()))
    if sum(f.stat().st_size for f in files) > max_bytes:
        return False
    for path in files:
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                if t.is_floating_point() and not bool(torch.isfinite(t).all()):
                    raise ModelFileError(f"{what} weight {name} in {path} contains NaN or inf: the model would "
                                         "produce NaN logits. Fix or rebuild the file; --taro-no-weight-check "
                                         "serves it anyway")
    return True


def tensor_sources(folder: Path, what: str, prefix: str = "") -> dict[str, tuple[str, Path, str]]:
    """``prefix + tensor name`` -> (what, file, tensor name) for a model folder's safetensors weights."""
    try:
        return {prefix + n: (what, p, n) for n, p in check_weights(Path(folder), what).items()}
    except ModelFileError:
        return {}


def _all_finite_in_file(path: Path, name: str) -> bool:
    import torch
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return bool(torch.isfinite(f.get_tensor(name)).all())
    except Exception:  # cannot re-read it: trust the flag
        return False
