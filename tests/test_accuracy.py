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


# --- TAWP: statistics and selection are pure (hand-made inputs, no engine) -----------------------------------------

from benchmarks import accuracy_tawp, stats  # noqa: E402


def test_exact_mcnemar_on_hand_counted_tables():
    # 5 items only A gets right, none only B: p = 2 * (1/2)^5
    r = stats.mcnemar([1] * 5 + [1, 0, 0], [0] * 5 + [1, 0, 0])
    assert (r["a_only"], r["b_only"], r["n"]) == (5, 0, 8) and r["p"] == pytest.approx(0.0625)
    assert r["diff_points"] == pytest.approx(62.5)
    # 9 vs 1 discordant: p = 2 * (C(10,0) + C(10,1)) / 2^10
    r = stats.mcnemar([1] * 9 + [0] + [1] * 30, [0] * 9 + [1] + [1] * 30)
    assert r["p"] == pytest.approx(2 * 11 / 1024) and r["diff_points"] == pytest.approx(20.0)
    assert stats.mcnemar([1, 0], [0, 1])["p"] == 1.0 and stats.mcnemar([1, 1], [1, 1])["p"] == 1.0
    assert stats.binom_two_sided(0, 0) == 1.0
    with pytest.raises(ValueError):
        stats.mcnemar([1], [1, 0])


def test_exact_binomial_tail_matches_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")
    for n in (1, 7, 40, 400):
        for k in (0, n // 3, n // 2, n):
            assert stats.binom_two_sided(k, n) == pytest.approx(scipy_stats.binomtest(k, n).pvalue, rel=1e-9)


def test_selection_ties_go_to_the_smaller_alpha_and_the_first_router():
    assert stats.select_best_alpha({0.5: 0.4, 0.1: 0.3, 0.25: 0.4, 0.75: 0.2}) == 0.25
    assert stats.select_best_label({"TARo": 0.4, "TARo pref": 0.4, "TARo full": 0.1}) == "TARo"
    assert stats.select_best_label({"TARo": 0.3, "TARo pref": 0.4}) == "TARo pref"


def _hand_made(n: int = 20) -> dict:
    """Per-item correctness where test and validation disagree on the best fixed a and the best router."""
    def ok(k: int) -> list[bool]:
        return [True] * k + [False] * (n - k)
    return {
        "base": {"val": ok(5), "test": ok(5), "ood": ok(10)},
        "reward": {"val": ok(2), "test": ok(2), "ood": ok(2)},
        "fixed a=0.25": {"val": ok(8), "test": ok(6), "ood": ok(9)},
        "fixed a=0.5": {"val": ok(8), "test": ok(12), "ood": ok(4)},  # ties a=0.25 on val, best on test
        "TARo": {"val": ok(9), "test": ok(15), "ood": ok(10)},
        "TARo pref": {"val": ok(7), "test": ok(19), "ood": ok(10)},  # best on test, not on val
    }


def _by_class() -> dict:
    cls = {"digits": {"mean_a": 0.6, "tokens": 30}, "operators": {"mean_a": 0.3, "tokens": 10},
           "names/items": {"mean_a": 0.2, "tokens": 5}, "other words": {"mean_a": 0.3, "tokens": 5},
           "all": {"mean_a": 0.4, "tokens": 60}}
    ood = {"names/items": {"mean_a": 0.05, "tokens": 4}, "all": {"mean_a": 0.08, "tokens": 20}}
    return {"TARo": {"test": cls, "ood": ood}, "TARo pref": {"test": cls, "ood": ood}}


def test_tawp_report_selects_on_validation_never_on_test():
    report = accuracy_tawp.build_report(_hand_made(), [0.25, 0.5], ["TARo", "TARo pref"], _by_class())
    sel = report["selection"]
    assert (sel["best_fixed_alpha"], sel["best_fixed"], sel["taro"]) == (0.25, "fixed a=0.25", "TARo")
    assert sel["val_accuracy"]["TARo"] == pytest.approx(0.45)
    pairs = [(c["a"], c["b"]) for c in report["comparisons"]["test"]]
    assert pairs == [("TARo", "base"), ("TARo", "fixed a=0.25"), ("fixed a=0.25", "base"), ("TARo pref", "base")]
    taro_vs_base = report["comparisons"]["test"][0]
    assert (taro_vs_base["a_only"], taro_vs_base["b_only"]) == (10, 0)
    assert taro_vs_base["diff_points"] == pytest.approx(50.0) and taro_vs_base["p"] == pytest.approx(2 / 1024)
    # McNemar can be recomputed from the per-item correctness the report carries
    assert stats.mcnemar(report["correct"]["TARo"]["test"], report["correct"]["base"]["test"]) == \
        {k: v for k, v in taro_vs_base.items() if k not in ("a", "b")}
    holds = {r["target"]: r["holds"] for r in report["pattern"]}
    assert holds["in-domain: base < best fixed a < TARo"] is True  # 25 < 30 < 75
    assert holds["in-domain: TARo >= best fixed a + 3 points"] is True
    assert holds["OOD: TARo within 2 points of base"] is True
    assert holds["OOD: best fixed a loses >= 5 points vs base"] is True  # 50 -> 45
    # context words = names/items and other words: 0.525 vs 0.25
    assert holds["mean a_t on digits/operators >= 2x context words (names/items + other words; in-domain)"] is True
    assert holds["mean a_t on OOD outputs <= 0.1"] is True


def test_tawp_markdown_from_a_hand_made_report(tmp_path):
    report = accuracy_tawp.build_report(_hand_made(), [0.25, 0.5], ["TARo", "TARo pref"], _by_class())
    report.update(base="B", routers={"TARo": "R1", "TARo pref": "R2"}, data="D", seconds={"total": 60.0},
                  settings={"n_val": 20, "n_test": 20, "n_ood": 20, "n_gsm": 0, "max_tokens": 48,
                            "ood_max_tokens": 24, "eager": True, "dtype": "float32"})
    accuracy_tawp.write_md(report, tmp_path / "accuracy.md")
    md = (tmp_path / "accuracy.md").read_text()
    assert "| fixed a=0.25 **<- best fixed a (val-selected)** | 40.0%" in md
    assert "| TARo **<- TARo (val-selected)** | 45.0%" in md
    assert "| in-domain test | TARo | base | +50.0 | 10 | 0 | 0.00195 |" in md
    assert "| digits | 0.600 (30) |" in md


def test_tawp_token_context_words():
    assert accuracy_tawp.ood_context_words("Write the word 'apple' in capital letters.") == ("apple",)
    assert accuracy_tawp.ood_context_words("What is the capital of France?") == ()
    traces = [{"pieces": ["Tom", " 5", " +", " 3", " =", " 8", "\n", "APPLE"], "alphas": [0.1, 0.5, 0.4, 0.5, 0.2,
                                                                                             0.5, float("nan"), 0.0]}]
    by = accuracy_tawp.alpha_by_class(traces, [("Tom", "apple")])
    assert by["digits"] == {"mean_a": 0.5, "tokens": 3} and by["names/items"]["tokens"] == 2
    assert by["operators"]["mean_a"] == pytest.approx(0.4) and by["="]["tokens"] == 1
    assert by["all"]["tokens"] == 7  # the NaN is skipped


def scripted_engine(specs: list):
    """An engine stand-in recording each spec: TARo routers solve every in-domain problem, the other methods none."""
    from router_training import tawp

    splits = tawp.make_splits(accuracy_tawp.SMOKE_SIZES)

    def fake_engine(spec):
        specs.append(spec)
        results = {}
        for m in spec["methods"]:
            for task, t in spec["tasks"].items():
                solve = m["label"].startswith("TARo") and task in splits
                texts = [p.gold_solution() if solve else "1 + 1 = 2\nThe answer is 2." for p in splits[task]] \
                    if task in splits else ["x"] * len(t["prompts"])
                names = [p.name for p in splits[task]] if task in splits else ["Paul"] * len(texts)
                traces = [{"pieces": ["1", " +", " 1", " " + n], "alphas": [0.6, 0.4, 0.6, 0.1]} for n in names]
                results[f"{m['label']}|{task}"] = {"texts": texts, "traces": traces if m.get("trace") else None}
        return {"results": results, "seconds": {"startup": 1.0}}

    return fake_engine, splits


def test_tawp_run_end_to_end_with_scripted_engines(tmp_path, monkeypatch):
    """run() from items to files, with the engines replaced by scripted outputs."""
    from benchmarks import accuracy

    specs = []
    fake_engine, splits = scripted_engine(specs)
    monkeypatch.setattr(accuracy, "run_engine", fake_engine)
    args, _ = accuracy.parse_args(["--task", "tawp", "--smoke", "--out", str(tmp_path)])
    accuracy.smoke_setup(args)
    args.max_gsm = 0
    md = accuracy_tawp.run(args, [("full-logits", str(args.router_full))])
    # One engine serves both routers (same base and reward model): the main router's every method, the extra router
    # only its TARo, whose requests name it. Prompts are onpolicy.prompt_ids.
    assert [[m["label"] for m in s["methods"]] for s in specs] == \
        [["base", "reward", "fixed a=0.25", "fixed a=0.5", "TARo", "TARo full-logits"]]
    assert specs[0]["router"] == {"r0": str(args.router), "r1": str(args.router_full)}
    assert [m["extra_args"].get("taro_router") for m in specs[0]["methods"]] == [None] * 4 + ["r0", "r1"]
    from transformers import AutoTokenizer

    from router_training.onpolicy import prompt_ids
    tok = AutoTokenizer.from_pretrained(str(args.base))
    assert specs[0]["tasks"]["test"]["prompts"][0] == prompt_ids(tok, splits["test"][0].question)
    assert specs[0]["tasks"]["test"]["max_tokens"] == 8 and set(specs[0]["tasks"]) == {"val", "test", "ood"}
    report = json.loads((tmp_path / "accuracy.json").read_text())
    assert report["selection"]["taro"] == "TARo" and report["selected_router"] == str(args.router)
    assert report["correct"]["TARo"]["test"] == [1, 1, 1, 1] and report["correct"]["base"]["test"] == [0] * 4
    first = report["comparisons"]["test"][0]
    assert (first["a"], first["b"], first["a_only"], first["p"]) == ("TARo", "base", 4, pytest.approx(0.125))
    cls = report["alpha_by_token_class"]["TARo"]["test"]
    assert cls["digits"]["mean_a"] == pytest.approx(0.6) and cls["names/items"]["mean_a"] == pytest.approx(0.1)
    assert "| TARo **<- TARo (val-selected)** | 100.0%" in md
    for f in ("accuracy.md", "accuracy.png", "alphas.html"):
        assert (tmp_path / f).stat().st_size > 100


def test_a_router_of_another_reward_model_gets_its_own_engine(tmp_path, tiny_paths):
    """Routers share the first router's engine only when they fit its base and reward model."""
    from benchmarks.accuracy import engine_groups
    from engine_utils import make_router

    base, reward = (str(tiny_paths[k]) for k in ("tiny-llama-base", "tiny-llama-reward"))
    main, same = make_router(tmp_path / "main", base, reward), make_router(tmp_path / "same", base, reward, seed=1)
    other = make_router(tmp_path / "other", base, base)  # trained with the base as its reward model
    assert engine_groups(base, None, {"A": str(main), "B": str(same), "C": str(other)}) == \
        [{"A": str(main), "B": str(same)}, {"C": str(other)}]


def test_tawp_reuse_runs_only_the_new_router(tmp_path, monkeypatch):
    """--reuse: an earlier run's outputs stand for every method it already made; only the new router runs, and a
    run with other settings is refused rather than mixed in."""
    from benchmarks import accuracy

    specs = []
    fake_engine, _ = scripted_engine(specs)
    monkeypatch.setattr(accuracy, "run_engine", fake_engine)

    def run(out: str, *argv: str, extra=(), max_tokens: int = 8):
        args, _ = accuracy.parse_args(["--task", "tawp", "--smoke", "--out", str(tmp_path / out), *argv])
        accuracy.smoke_setup(args)  # fresh random routers: pin the main checkpoint, the same in every run
        args.router, args.max_gsm, args.max_tokens = first_router, 0, max_tokens
        return accuracy_tawp.run(args, list(extra))

    args, _ = accuracy.parse_args(["--task", "tawp", "--smoke"])
    accuracy.smoke_setup(args)
    first_router = args.router
    run("first")
    specs.clear()
    run("second", "--reuse", str(tmp_path / "first"), extra=[("new", str(args.router_full))])
    assert [[m["label"] for m in s["methods"]] for s in specs] == [["TARo new"]]
    first = json.loads((tmp_path / "first" / "accuracy.json").read_text())
    second = json.loads((tmp_path / "second" / "accuracy.json").read_text())
    for label in ("base", "reward", "fixed a=0.25", "TARo"):
        assert second["outputs"][label] == first["outputs"][label] and second["reused"][label]
    assert second["correct"]["TARo new"]["test"] == [1, 1, 1, 1]
    with pytest.raises(SystemExit, match="max_tokens: 8 != 9"):
        run("third", "--reuse", str(tmp_path / "first"), max_tokens=9)


@pytest.mark.engine
def test_tawp_accuracy_smoke_through_the_plugin(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.accuracy", "--task", "tawp", "--smoke", "--out",
                        str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "accuracy.json").read_text())
    methods = {"base", "reward", "fixed a=0.25", "fixed a=0.5", "TARo", "TARo full-logits"}
    assert {row["method"] for row in report["rows"]} == methods
    sizes = {"val": 4, "test": 4, "ood": 3, "gsm": 2}
    core = methods - {"TARo full-logits"}
    assert {(row["method"], row["task"]): row["n"] for row in report["rows"]} == \
        {(m, t): n for m in methods for t, n in sizes.items()}
    assert report["items"]["test"][0].startswith("tawp-test-") and len(report["items"]["ood"]) == 3
    # per-item correctness of every method, and the selection was made on validation
    assert all(len(report["correct"][m][t]) == n for m in methods for t, n in sizes.items())
    sel = report["selection"]
    assert report["selected_router"] == report["routers"][sel["taro"]]
    assert sel["best_fixed"] in core and sel["taro"] in {"TARo", "TARo full-logits"}
    assert sel["best_fixed_alpha"] == stats.select_best_alpha(
        {a: sum(report["correct"][f"fixed a={a:g}"]["val"]) for a in (0.25, 0.5)})
    assert [len(report["comparisons"][t]) for t in ("test", "ood")] == [4, 4]
    # a_t recorded for each TARo router, in-domain and OOD; a random router's a_t lie strictly inside (0, 1)
    by_class = report["alpha_by_token_class"]
    assert set(by_class) == {"TARo", "TARo full-logits"}
    assert all(0 < v["mean_a"] < 1 for m in by_class.values() for t in ("test", "ood") for v in m[t].values())
    assert len(report["outputs"]["TARo"]["test"]["traces"]) == 4 and "traces" not in report["outputs"]["base"]["test"]
    assert len(report["pattern"]) == 7
    md = (tmp_path / "accuracy.md").read_text()
    assert "best fixed a (val-selected)" in md and "TARo (val-selected)" in md and "McNemar" in md
    assert md.strip() in r.stdout
    for f in ("accuracy.md", "accuracy.png", "alphas.html"):
        assert (tmp_path / f).stat().st_size > 100


def test_the_recipe_report_sets_taro_against_the_reward_model_alone(tmp_path):
    """The fixed-a selection never includes a = 1, so the report compares the selected TARo with the reward alone."""
    from router_training import recipe_report

    (tmp_path / "eval").mkdir()
    correct = {"TARo pref": {"test": [1, 1, 0, 0], "ood": [1, 1]}, "reward": {"test": [1, 1, 1, 1], "ood": [0, 1]}}
    (tmp_path / "eval" / "accuracy.json").write_text(json.dumps({"selection": {"taro": "TARo pref"},
                                                                  "correct": correct}))
    rows = recipe_report.versus_reward_alone(tmp_path)
    assert rows[2] == "| in-domain test | TARo pref | reward | -50.0 | 0 | 2 | 0.5 |"
    assert rows[3] == "| out-of-domain | TARo pref | reward | +50.0 | 1 | 0 | 1 |"
    del correct["reward"]  # a run without the reward-alone method: no table
    (tmp_path / "eval" / "accuracy.json").write_text(json.dumps({"selection": {"taro": "TARo pref"},
                                                                  "correct": correct}))
    assert recipe_report.versus_reward_alone(tmp_path) == []
