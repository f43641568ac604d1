"""Real step-level preference pairs from ``champ-dataset`` (MIT): competition problems whose model solutions carry a
human-annotated *first wrong step*.

For every annotated solution with a wrong step:

* prefix   = the model's own text before the first wrong step (correct, by the annotation's definition);
* rejected = the first wrong step (the annotated span);
* chosen   = one step of the problem's reference solution, picked at the same relative position in the solution
  (``round(start / len(text) * n_steps)``). The annotation has no correct continuation of the model's own prefix,
  so this is an approximation: chosen is a correct step for this problem at roughly the same stage of the argument.

Pairs are grouped by problem (``group = champ:<problem id>``), so a held-out split never shares a problem.
"""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

from router_training.data import StepPair
from router_training.errors import DataError

MAX_STEP_CHARS = 600  # longer "steps" are whole paragraphs of derivation; they would dominate the summed log-prob


def champ_file() -> Path:
    spec = importlib.util.find_spec("champ_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise DataError("package champ-dataset is not installed; run: pip install champ-dataset")
    path = Path(list(spec.submodule_search_locations)[0]) / "dataset_files" / "v0.json"
    if not path.is_file():
        raise DataError(f"{path} is missing from champ-dataset; reinstall champ-dataset==1.0.0")
    return path


def load_champ(path: str | Path | None = None) -> dict[str, Any]:
    p = Path(path) if path is not None else champ_file()
    try:
        data = json.loads(p.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(f"{p} is not a readable champ JSON file ({e})") from None
    if not isinstance(data, dict) or not isinstance(data.get("problems"), dict):
        raise DataError(f"{p} has no 'problems' mapping; expected champ-dataset's v0.json")
    return data


def build_pairs(data: dict[str, Any] | None = None) -> list[StepPair]:
    data = data if data is not None else load_champ()
    pairs = []
    for pid, prob in sorted(data["problems"].items()):
        steps = [s["_text"].strip() for s in prob["solution"]["steps"] if s.get("_text", "").strip()]
        if not steps:
            continue
        question = prob["_text"].strip()
        answer = str(prob.get("_answer", "")).strip()
        for key, ann in sorted(prob.get("fws_annotations", {}).items()):
            start, end, text = ann.get("start_idx"), ann.get("end_idx"), ann.get("text", "")
            if start is None or end is None or not text:
                continue  # solution judged fully correct: no wrong step, no pair
            rejected = text[start:end].strip()
            if not rejected or len(rejected) > MAX_STEP_CHARS:
                continue
            j = min(len(steps) - 1, round(start / max(1, len(text)) * len(steps)))
            chosen = steps[j]
            prefix = text[:start]
            if prefix and not prefix.endswith("\n"):
                prefix = prefix.rstrip() + "\n"
            pairs.append(StepPair(
                dataset="champ", prompt=question, initial_reason_steps=prefix, chosen=chosen, rejected=rejected,
                full_chosen="\n".join(steps), full_rejected=text[:end], answer=answer,
                id=f"champ-{pid}-{key}", group=f"champ:{pid}",
            ))
    return pairs
