"""The accuracy benchmark's answer extractor, OOD checks, and a smoke run on tiny models through the plugin."""

import json
import subprocess
import sys

import pytest

from benchmarks.answers import extract_answer, is_correct
from benchmarks.ood_tasks import make_tasks


@pytest.mark.parametrize("text,expected", [
    ("She sold 48 + 24 = 72 clips.\n#### 72", 72),
    ("So the total is $1,250.50.", 1250.5),
    ("Step 1: 3 + 4 = 7. Step 2: 7 * 2 = 14. The answer is 14.", 14),
    ("The answer is: **18**", 18),
    ("\\boxed{-3}", -3),
    ("First 5 apples, then 6. Final answer: 11 apples", 11),
    ("The answer is 9. Wait, recheck: 10 - 1 = 9... The answer is 12", 12),  # the last marker wins
    ("no numbers here", None),
])
def test_extract_answer(text, expected):
    assert extract_answer(text) == expected


def test_is_correct_compares_numbers_not_strings():
    assert is_correct("The answer is 18.00", "18") and not is_correct("The answer is 17", "18")
    assert is_correct("#### 1,000", "1000")


def test_ood_tasks_are_checkable():
    tasks = make_tasks(10)
    assert len({t.id for t in tasks}) == 10
    up = next(t for t in tasks if t.id.startswith("upper"))
    word = up.instruction.split("'")[1]
    assert up.check(word.upper()) and not up.check(word)
    cap = next(t for t in tasks if t.id.startswith("capital"))
    assert not cap.check("Step 1: 3 + 4 = 7")


@pytest.mark.engine
def test_accuracy_smoke_through_the_plugin(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "accuracy.json").read_text())
    methods = {row["method"] for row in report["rows"]}
    assert methods == {"base", "reward", "fixed a=0.5", "TARo top-K", "TARo full-logits"}
    assert all(row["n"] == 3 for row in report["rows"])
    # a_t were recorded for each TARo router's tokens, and a random router's a_t lie strictly inside (0, 1)
    by_class = report["alpha_by_token_class"]
    assert set(by_class) == {"TARo top-K", "TARo full-logits"}
    assert all(0 < v["mean_a"] < 1 for classes in by_class.values() for v in classes.values())
    for f in ("accuracy.md", "accuracy.png", "alphas.html"):
        assert (tmp_path / f).stat().st_size > 100
