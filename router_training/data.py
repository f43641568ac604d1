"""Two record types and their files (JSONL or Parquet, chosen by suffix).

* :class:`StepPair` - the Math-Step-DPO-10K schema (``dataset, prompt, initial_reason_steps, chosen, rejected,
  full_chosen, full_rejected, answer``): ``chosen`` / ``rejected`` are alternative *next* reasoning steps after
  ``prompt + initial_reason_steps``. Two optional columns are ours: ``id`` (unique) and ``group`` (the source
  problem / template, so held-out splits never share a problem with training).
* :class:`Solution` - ``prompt`` + a correct ``solution`` text, what the router is teacher-forced on. A Math-Step-DPO
  file also works: its ``full_chosen`` is then the solution.

Every loading failure is a :class:`DataError` naming the file, the row and the fix.
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, TypeVar

from router_training.errors import DataError

STEP_DPO_COLUMNS = ("dataset", "prompt", "initial_reason_steps", "chosen", "rejected", "full_chosen",
                    "full_rejected", "answer")


@dataclass(frozen=True)
class StepPair:
    dataset: str
    prompt: str
    initial_reason_steps: str
    chosen: str
    rejected: str
    full_chosen: str
    full_rejected: str
    answer: str
    id: str = ""
    group: str = ""
    error_type: str = ""  # on-policy pairs: what the rejected line got wrong (router_training.tawp.ErrorType)


@dataclass(frozen=True)
class Solution:
    prompt: str
    solution: str
    id: str = ""
    group: str = ""
    dataset: str = ""  # selects the prompt format (router_training.encoding.PROMPT_FORMATS); "" = one user turn


def _stable_group(prompt: str) -> str:
    # External Math-Step-DPO files have no problem id: pairs of one prompt must still land on one side of a split.
    return "prompt:" + hashlib.sha1(prompt.encode()).hexdigest()[:12]


def _read_rows(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.exists():
        raise DataError(f"data file {p} does not exist")
    if p.is_dir():
        raise DataError(f"data file {p} is a directory; pass a .jsonl or .parquet file")
    suffix = p.suffix.lower()
    if suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        try:
            rows = pq.read_table(p).to_pylist()
        except (pa.ArrowException, OSError) as e:
            raise DataError(f"{p} is not a readable Parquet file ({e})") from None
    elif suffix in (".jsonl", ".json"):
        rows = []
        try:
            text = p.read_text(encoding="utf-8")
        except UnicodeDecodeError:
            raise DataError(f"{p} is not UTF-8 text; expected JSON Lines (one JSON object per line)") from None
        for n, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{p}, line {n}: not valid JSON ({e.msg}); expected one JSON object per line") from None
            if not isinstance(row, dict):
                raise DataError(f"{p}, line {n}: expected a JSON object, got {type(row).__name__}")
            rows.append(row)
    else:
        raise DataError(f"{p}: unknown data format {suffix!r}; use .jsonl or .parquet")
    if not rows:
        raise DataError(f"data file {p} is empty")
    return rows


def _text(row: dict[str, Any], col: str, where: str) -> str:
    v = row.get(col)
    if v is None:
        return ""
    if not isinstance(v, str):
        raise DataError(f"{where}: column {col!r} must be a string, got {type(v).__name__}")
    return v


def _require(rows: list[dict[str, Any]], cols: Sequence[str], path: Path, what: str) -> None:
    missing = [c for c in cols if c not in rows[0]]
    if missing:
        raise DataError(
            f"{path} is not a {what} file: missing column(s) {missing} (found {sorted(rows[0])}); "
            f"expected {list(cols)}"
        )


def load_step_pairs(path: str | Path) -> list[StepPair]:
    """Read a Math-Step-DPO-style file (JSONL or Parquet)."""
    p = Path(path)
    rows = _read_rows(p)
    _require(rows, ("prompt", "initial_reason_steps", "chosen", "rejected"), p, "Math-Step-DPO pair")
    pairs = []
    for i, row in enumerate(rows):
        where = f"{p}, row {i + 1}"
        vals = {c: _text(row, c, where) for c in (*STEP_DPO_COLUMNS, "id", "group", "error_type")}
        if not vals["prompt"] or not vals["chosen"] or not vals["rejected"]:
            raise DataError(f"{where}: prompt, chosen and rejected must be non-empty")
        vals["id"] = vals["id"] or f"row{i}"
        vals["group"] = vals["group"] or _stable_group(vals["prompt"])
        pairs.append(StepPair(**vals))
    return pairs


def load_solutions(path: str | Path) -> list[Solution]:
    """Read (prompt, solution) records; a Math-Step-DPO file is read through its ``full_chosen`` column."""
    p = Path(path)
    rows = _read_rows(p)
    col = "solution" if "solution" in rows[0] else "full_chosen"
    _require(rows, ("prompt", col), p, "solution (prompt, solution) or Math-Step-DPO")
    out = []
    for i, row in enumerate(rows):
        where = f"{p}, row {i + 1}"
        prompt, sol = _text(row, "prompt", where), _text(row, col, where)
        if not prompt or not sol:
            raise DataError(f"{where}: prompt and {col} must be non-empty")
        out.append(Solution(prompt, sol, _text(row, "id", where) or f"row{i}",
                            _text(row, "group", where) or _stable_group(prompt), _text(row, "dataset", where)))
    return out


def save_records(path: str | Path, records: Iterable[StepPair | Solution]) -> Path:
    """Write records as JSONL or Parquet (by suffix); written to a temp file and renamed (no half files)."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    rows = [asdict(r) for r in records]
    tmp = p.with_name(p.name + ".tmp")
    if p.suffix.lower() == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.Table.from_pylist(rows), tmp)
    elif p.suffix.lower() in (".jsonl", ".json"):
        with open(tmp, "w", encoding="utf-8") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    else:
        raise DataError(f"{p}: unknown data format {p.suffix!r}; use .jsonl or .parquet")
    tmp.replace(p)
    return p


T = TypeVar("T", StepPair, Solution)


def split_by_group(records: Sequence[T], heldout_fraction: float, seed: int = 0) -> tuple[list[T], list[T]]:
    """Train / held-out split by ``group`` (problem or template), so no problem sits on both sides."""
    groups = sorted({r.group for r in records})
    random.Random(seed).shuffle(groups)
    n_held = max(1, round(heldout_fraction * len(groups))) if heldout_fraction > 0 and len(groups) > 1 else 0
    held = set(groups[:n_held])
    return [r for r in records if r.group not in held], [r for r in records if r.group in held]
