"""Smoke run of the throughput benchmark on tiny models (few tokens): the script users run, end to end."""

import json
import subprocess
import sys

import pytest




@pytest.mark.engine
def test_throughput_smoke_writes_table_plot_and_ratios(tmp_path):
    r = subprocess.run([sys.executable, "-m", "benchmarks.throughput", "--smoke", "--out", str(tmp_path)],
                       capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    report = json.loads((tmp_path / "throughput.json").read_text())
    labels = {row["label"] for row in report["rows"]}
    assert {"base alone", "reward alone", "fixed a=0.5 (GenARM mix)", "TARo top-K", "TARo full-logits",
            "GenARM-style HF loop (batch 1)"} <= labels
    assert all(row["output_tokens"] > 0 and row["tokens_per_s"] > 0 for row in report["rows"])
    assert "router overhead" in " ".join(report["ratios"]["float32, batch 2"])
    assert "two-model bound" in " ".join(report["ratios"]["float32, batch 2"])
    assert (tmp_path / "throughput.png").stat().st_size > 10_000
    assert "| TARo top-K | float32 | 2 |" in (tmp_path / "throughput.md").read_text()
    # the smoke runs its four engines one after another in one process (one vLLM start), and says so
    assert report["one_process"] and len(report["engines"]) == 4
    assert "peak RSS is the running maximum" in (tmp_path / "throughput.md").read_text()


def test_router_op_microbenchmark_smoke(tmp_path):
    from benchmarks import router_op

    argv = ["--vocab", "1000", "--batch", "1", "4", "--repeats", "1", "--min-time", "0", "--profile",
            "--out", str(tmp_path)]
    assert router_op.main(argv) == 0
    rows = json.loads((tmp_path / "router_op.json").read_text())["rows"]
    assert {(r["batch"], r["router"]) for r in rows} == {(1, "topk"), (1, "full"), (4, "topk"), (4, "full")}
    assert all(r["fused_ms"] > 0 and r["fused_GBps"] > 0 and r["mix_only_ms"] > 0 and r["copy_GBps"] > 0 for r in rows)
    # the top-K router's features next to a plain copy of the same bytes, measured in the same run
    assert all((r["features_GBps"] is not None and r["features_GBps"] > 0 and r["features_over_copy"] > 0)
               == (r["router"] == "topk") for r in rows)
    assert "features/copy" in (tmp_path / "router_op.md").read_text()
    assert (tmp_path / "router_op.png").stat().st_size > 10_000
    # where the two ops spend their time, at the largest shape asked for
    prof = json.loads((tmp_path / "router_op_profile.json").read_text())
    assert (prof["vocab"], prof["batch"]) == (1000, 4) and set(prof["ops"]) == {"fused top-K", "fixed-a mix"}
    assert any(o["op"] == "aten::topk" for o in prof["ops"]["fused top-K"]["top"])
    assert "### fused top-K:" in (tmp_path / "router_op_profile.md").read_text()


@pytest.mark.engine
def test_online_serve_bench_sweeps_modes_and_concurrency(taro_server_url, tmp_path):
    from benchmarks import serve_bench

    url, _ = taro_server_url
    rc = serve_bench.main(["--url", url, "--concurrency", "1", "3", "--requests", "3", "--max-tokens", "5",
                           "--modes", "router", "fixed:0.5", "--out", str(tmp_path)])
    assert rc == 0
    rows = json.loads((tmp_path / "serve_bench.json").read_text())["rows"]
    assert [(r["mode"], r["concurrency"]) for r in rows] == [("router", 1), ("router", 3), ("fixed:0.5", 1),
                                                             ("fixed:0.5", 3)]
    # ignore_eos: every request streams exactly max_tokens tokens
    assert all(r["errors"] == 0 and r["output_tokens"] == 3 * 5 and r["ttft_p50_s"] > 0 for r in rows)
    assert "| fixed:0.5 | 3 | 3 / 3 |" in (tmp_path / "serve_bench.md").read_text()


def test_feature_costs_smoke_compares_routers_and_a_t_side_by_side(taro_server_url, tmp_path):
    from benchmarks import feature_costs

    url, _ = taro_server_url  # the a_t comparison runs against the session server (it has --taro-return-alphas)
    assert feature_costs.main(["--smoke", "--url", url, "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "feature_costs.json").read_text())
    assert len(report["routers"]["one_router_tok_s"]) == len(report["routers"]["four_routers_tok_s"]) == 1
    assert report["routers"]["ratio_four_over_one"] > 0 and report["alphas"]["ratio_alphas_over_plain"] > 0
    md = (tmp_path / "feature_costs.md").read_text()
    assert "4 routers mixed in one batch vs one router" in md and "a_t in the streamed responses vs not" in md
    # Re-measuring one comparison keeps the other from the last run, and each row says when it was measured.
    assert feature_costs.main(["--smoke", "--url", url, "--out", str(tmp_path), "--only", "alphas"]) == 0
    again = json.loads((tmp_path / "feature_costs.json").read_text())
    assert again["routers"] == report["routers"] and again["alphas"]["measured_at"] >= report["alphas"]["measured_at"]
    assert (tmp_path / "feature_costs.md").read_text().count(" rounds, 20") == 2


def test_online_serve_bench_rejects_unknown_mode_and_missing_server(tmp_path):
    from benchmarks import serve_bench

    with pytest.raises(SystemExit):
        serve_bench.main(["--modes", "sometimes", "--out", str(tmp_path)])
    from benchmarks.server_process import free_port

    assert serve_bench.main(["--url", f"http://127.0.0.1:{free_port()}", "--out", str(tmp_path)]) == 2


def test_serve_compare_puts_taro_next_to_plain_vllm_per_concurrency(tmp_path):
    """The online comparison's table, ratios and plot from hand-made serve_bench rows (no server)."""
    from benchmarks import serve_compare

    def row(server, mode, c, tpot):
        return {"server": server, "mode": mode, "concurrency": c, "requests": 2 * c, "completed": 2 * c,
                "errors": 0, "tokens_per_s": 10.0 * c / tpot, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2,
                "tpot_p50_s": tpot, "tpot_p99_s": 2 * tpot}

    rows = [row("plain vLLM", "none", 1, 0.02), row("plain vLLM", "none", 8, 0.05),
            row("TARo", "router", 1, 0.04), row("TARo", "router", 8, 0.11)]
    assert serve_compare.ratios(rows) == pytest.approx({"router c=1": 2.0, "router c=8": 2.2})
    report = {"base": "b", "reward": "r", "dtype": "float32", "max_tokens": 8, "input_len": 8, "machine": "m",
              "rows": rows, "ratios": serve_compare.ratios(rows)}
    serve_compare.write_outputs(report, tmp_path)
    md = (tmp_path / "serve_compare.md").read_text()
    assert "| TARo | router | 8 | 16 / 16 |" in md and "| router c=8 | **2.20** |" in md
    assert (tmp_path / "serve_compare.png").stat().st_size > 1000


def test_mixed_run_also_reports_the_summed_rate_of_all_clients(tmp_path):
    """--mixed: each mode's TPOT depends on how the shared steps split between the clients; plain vLLM's tok/s over
    the clients' summed tok/s is what the shared steps cost, in the table next to the per-mode ratios."""
    from benchmarks import serve_compare

    def row(server, mode, c, tps):
        return {"server": server, "mode": mode, "concurrency": c, "requests": 2 * c, "completed": 2 * c,
                "errors": 0, "tokens_per_s": tps, "ttft_p50_s": 0.1, "ttft_p99_s": 0.2, "tpot_p50_s": 10 / tps,
                "tpot_p99_s": 20 / tps}

    rows = [row("plain vLLM", "none", 8, 120.0), row("plain vLLM", "none", 64, 180.0),
            row("TARo", "router [mixed]", 8, 40.0), row("TARo", "fixed:0.5 [mixed]", 8, 20.0),
            row("TARo", "router [mixed]", 64, 50.0), row("TARo", "fixed:0.5 [mixed]", 64, 40.0)]
    assert serve_compare.mixed_slowdown(rows) == pytest.approx({"all modes [mixed] c=8": 2.0,
                                                                "all modes [mixed] c=64": 2.0})
    assert serve_compare.mixed_slowdown(rows[:2] + [row("TARo", "router", 8, 60.0)]) == {}  # not a mixed run
    report = {"base": "b", "reward": "r", "dtype": "float32", "max_tokens": 8, "input_len": 8, "machine": "m",
              "rows": rows, "ratios": serve_compare.ratios(rows)}
    serve_compare.write_outputs(report, tmp_path, "mixed")
    assert "| all modes [mixed] c=64 | **2.00** |" in (tmp_path / "mixed.md").read_text()
    assert json.loads((tmp_path / "mixed.json").read_text())["mixed_slowdown"]["all modes [mixed] c=8"] == 2.0


@pytest.mark.engine
def test_mixed_point_sends_the_modes_at_once_with_vllm_bench_serve(taro_server_url, tmp_path):
    """--mixed: one vllm bench serve client per TARo mode, at the same time, the concurrency split between them."""
    from types import SimpleNamespace

    from benchmarks import serve_compare

    url, _ = taro_server_url
    rows = serve_compare.mixed_point(url, 4, ["router", "base"], SimpleNamespace(max_tokens=4, input_len=8), tmp_path)
    assert [(r["mode"], r["concurrency"], r["client_concurrency"]) for r in rows] == \
        [("router [mixed]", 4, 2), ("base [mixed]", 4, 2)]
    assert all(r["completed"] == r["requests"] == 8 and r["errors"] == 0 and r["tpot_p50_s"] > 0 for r in rows)


def test_serve_compare_add_merges_new_points_into_the_same_setup_only():
    """--add: a new concurrency point joins the earlier table (re-measured points replace theirs); another setup is
    refused, naming what differs."""
    from benchmarks import serve_compare

    def row(server, c, tpot, when):
        return {"server": server, "mode": "none" if server == "plain vLLM" else "router", "concurrency": c,
                "tpot_p50_s": tpot, "measured_at": when}

    setup = {"base": "b", "reward": "r", "router": "R", "dtype": "float32", "max_tokens": 32, "input_len": 32,
             "eager": True}
    earlier = {**setup, "rows": [row("plain vLLM", 1, 0.4, "day 1"), row("plain vLLM", 8, 0.6, "day 1"),
                                 row("TARo", 1, 0.6, "day 1"), row("TARo", 8, 0.9, "day 1")]}
    new = {**setup, "rows": [row("plain vLLM", 8, 0.5, "day 2"), row("plain vLLM", 64, 2.0, "day 2"),
                             row("TARo", 8, 0.8, "day 2"), row("TARo", 64, 3.0, "day 2")]}
    merged = serve_compare.merge(earlier, new)
    assert [(r["server"], r["concurrency"], r["measured_at"]) for r in merged["rows"]] == [
        ("plain vLLM", 1, "day 1"), ("plain vLLM", 8, "day 2"), ("plain vLLM", 64, "day 2"),
        ("TARo", 1, "day 1"), ("TARo", 8, "day 2"), ("TARo", 64, "day 2")]
    assert merged["ratios"] == pytest.approx({"router c=1": 1.5, "router c=8": 1.6, "router c=64": 1.5})
    with pytest.raises(ValueError, match="eager: True vs False"):
        serve_compare.merge(earlier, {**new, "eager": False})


def test_startup_and_feature_costs_replot_their_tables_and_plots_from_json(tmp_path):
    """--replot re-renders a run's table and PNG from its JSON (nothing is measured)."""
    from benchmarks import feature_costs, startup

    rows = [{"setup": s, "start": k, "seconds": t, "eager": False}
            for s, k, t in (("base alone", "cold", 150.2), ("base alone", "warm", 73.6), ("TARo", "cold", 182.3),
                            ("TARo", "warm", 97.6))]
    (tmp_path / "startup.json").write_text(json.dumps({"base": "B", "router": "R", "rows": rows}))
    assert startup.main(["--replot", "--out", str(tmp_path)]) == 0
    assert "| TARo | 182.3 s | 97.6 s |" in (tmp_path / "startup.md").read_text()
    costs = {"base": "B", "reward": "B", "dtype": "float32", "max_tokens": 64, "rounds": 2, "machine": "2 CPU cores",
             "routers": {"batch": 32, "one_router_tok_s": [80.0, 90.0], "four_routers_tok_s": [78.0, 91.0],
                         "ratio_four_over_one": 84.5 / 85.0},
             "alphas": {"concurrency": 32, "errors": False, "router_tok_s": [50.0, 60.0],
                        "router_alphas_tok_s": [49.0, 61.0], "ratio_alphas_over_plain": 1.0}}
    (tmp_path / "feature_costs.json").write_text(json.dumps(costs))
    assert feature_costs.main(["--replot", "--out", str(tmp_path)]) == 0
    md = (tmp_path / "feature_costs.md").read_text()
    assert "**0.994** (>= 0.95)" in md and "49.0, 61.0 vs 50.0, 60.0" in md
    for png in ("startup.png", "feature_costs.png"):
        assert (tmp_path / png).stat().st_size > 10_000


def test_throughput_table_ratios_and_plot_per_dtype_with_the_two_model_bound(tmp_path):
    """Each dtype's rows give their own ratios; the bound 1/(1/base + 1/reward) is what TARo is held against."""
    from benchmarks import throughput

    def row(label, engine, dtype, bs, tps):
        return {"label": label, "engine": engine, "dtype": dtype, "batch_size": bs, "tokens_per_s": tps,
                "output_tokens": 8 * bs, "seconds": 8 * bs / tps}

    rows = [row(lbl, eng, dt, bs, tps * (1 if dt == "float32" else 0.5) * bs)
            for dt in ("float32", "bfloat16") for bs in (1, 4)
            for lbl, eng, tps in (("base alone", "base", 10.0), ("reward alone", "reward", 30.0),
                                  ("fixed a=0.5 (GenARM mix)", "taro-topk", 7.0), ("TARo top-K", "taro-topk", 7.0))]
    assert throughput.bound(rows[:4], 1) == pytest.approx(7.5)
    r = {dt: throughput.ratios([x for x in rows if x["dtype"] == dt], 4, dt) for dt in ("float32", "bfloat16")}
    f1 = r["float32"]["float32, batch 1"]
    assert f1["TARo top-K / two-model bound 1/(1/base + 1/reward) (target >= 0.9)"] == pytest.approx(7 / 7.5)
    assert f1["router overhead: TARo top-K / fixed-a (target >= 0.97)"] == pytest.approx(1.0)
    assert "bfloat16, batch 4" in r["bfloat16"] and not any("GenARM" in k for k in r["float32"])  # no HF rows
    report = {"base": "/m/Qwen-1.5B", "dtypes": ["float32", "bfloat16"], "cpu_count": 2, "rows": rows,
              "engines": {"base (float32)": {"startup_s": 60.0}}, "ratios": {**r["float32"], **r["bfloat16"]}}
    throughput.write_outputs(report, tmp_path, "throughput_w2s")
    md = (tmp_path / "throughput_w2s.md").read_text()
    assert "| TARo top-K | bfloat16 | 4 | 14.0 |" in md and "| base (float32) | 60.0 |" in md
    assert (tmp_path / "throughput_w2s.png").stat().st_size > 10_000


def test_throughput_w2s_without_the_qwen_assets_says_how_to_get_them(tmp_path, monkeypatch, capsys):
    from benchmarks import throughput

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    with pytest.raises(SystemExit, match="taro-vllm assets qwen-coder"):
        throughput.main(["--w2s", "--out", str(tmp_path)])


@pytest.mark.engine
def test_profile_step_names_where_a_taro_batch_spends_its_time(tmp_path):
    from benchmarks import profile_step

    assert profile_step.main(["--smoke", "--modes", "router", "--out", str(tmp_path)]) == 0
    report = json.loads((tmp_path / "profile_smoke.json").read_text())
    ops = report["modes"]["router"]["ops"]
    assert ops and all(o["calls"] > 0 for o in ops) and report["modes"]["router"]["self_cpu_total_ms"] > 0
    assert any(o["name"].startswith("aten::") for o in ops)  # the model runner's ops were in the profiled process
    assert {s["name"] for s in report["modes"]["router"]["taro_stages"]} == {"taro::router", "taro::mix"}
    assert "| op | self CPU (ms) | share | calls |" in (tmp_path / "profile_smoke.md").read_text()
