"""Math-Step-DPO files: JSONL and Parquet round trips, solutions read from either schema, clear errors."""

from __future__ import annotations

import json

import pytest

from router_training.data import (STEP_DPO_COLUMNS, Solution, StepPair, load_solutions, load_step_pairs,
                                  save_records, split_by_group)
from router_training.errors import DataError


def example_pairs() -> list[StepPair]:
    return [
        StepPair("gsm8k", "Tom has 3 apples and buys 4 more. How many?", "Tom starts with 3 apples.\n",
                 "He has 3 + 4 = 7 apples.", "He has 3 + 4 = 8 apples.",
                 "Tom starts with 3 apples.\nHe has 3 + 4 = 7 apples.",
                 "Tom starts with 3 apples.\nHe has 3 + 4 = 8 apples.", "7", id="a", group="tom"),
        StepPair("MATH", "Compute 2^5.", "", "2^5 = 32.", "2^5 = 10.", "2^5 = 32.", "2^5 = 10.", "32", id="b",
                 group="pow"),
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_step_pairs_round_trip(tmp_path, suffix):
    path = save_records(tmp_path / f"pairs{suffix}", example_pairs())
    assert load_step_pairs(path) == example_pairs()


def test_a_file_in_the_public_schema_loads_without_our_id_columns(tmp_path):
    # Exactly the 8 columns of Math-Step-DPO-10K: ids are made up, groups derived from the prompt.
    rows = [{c: getattr(p, c) for c in STEP_DPO_COLUMNS} for p in example_pairs()]
    rows.append(dict(rows[0]))  # a second pair on the same problem
    path = tmp_path / "step_dpo.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    pairs = load_step_pairs(path)
    assert [p.id for p in pairs] == ["row0", "row1", "row2"]
    assert pairs[0].group == pairs[2].group != pairs[1].group
    # ... and serves as router data through full_chosen
    assert load_solutions(path)[0].solution == rows[0]["full_chosen"]


def test_split_by_group_never_splits_a_problem():
    pairs = [StepPair("d", f"q{i // 3}", "", "c", "r", "", "", "", id=str(i), group=f"g{i // 3}") for i in range(30)]
    train, held = split_by_group(pairs, 0.2, seed=0)
    assert len(held) == 6 and len(train) == 24
    assert not {p.group for p in train} & {p.group for p in held}
    assert split_by_group(pairs, 0.2, seed=0) == (train, held)


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_solutions_round_trip(tmp_path, suffix):
    sols = [Solution("What is 2 + 2?", "2 + 2 = 4\nThe answer is 4.", id="x", group="x")]
    assert load_solutions(save_records(tmp_path / f"s{suffix}", sols)) == sols


@pytest.mark.parametrize("name, content, message", [
    ("missing.jsonl", None, "does not exist"),
    ("empty.jsonl", "", "is empty"),
    ("blank.jsonl", "\n\n", "is empty"),
    ("bad.jsonl", '{"prompt": "p"}\n{oops\n', "line 2: not valid JSON"),
    ("list.jsonl", "[1, 2]\n", "line 1: expected a JSON object"),
    ("cols.jsonl", '{"question": "q", "chosen": "c"}\n', "missing column(s)"),
    ("types.jsonl", '{"prompt": "p", "initial_reason_steps": "", "chosen": 3, "rejected": "r"}\n',
     "row 1: column 'chosen' must be a string"),
    ("blank_step.jsonl", '{"prompt": "p", "initial_reason_steps": "", "chosen": "", "rejected": "r"}\n',
     "must be non-empty"),
    ("broken.parquet", "not parquet at all", "not a readable Parquet file"),
    ("pairs.csv", "a,b\n", "unknown data format '.csv'"),
])
def test_bad_files_raise_a_clear_data_error(tmp_path, name, content, message):
    path = tmp_path / name
    if content is not None:
        path.write_text(content)
    with pytest.raises(DataError) as e:
        load_step_pairs(path)
    assert message in str(e.value) and name in str(e.value)
