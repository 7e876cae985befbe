"""`mscp bench` reports every figure the scale issue asks for, each measured (positive, consistent)."""
from __future__ import annotations

import json

import pytest

from mscp.cli import main


@pytest.fixture(scope="module")
def figures(llama_trio, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench") / "bench.json"
    work = tmp_path_factory.mktemp("bench-work")
    assert main(["bench", "--base", str(llama_trio["base"]), "--aligned", str(llama_trio["aligned"]),
                 "--adapter", str(llama_trio["adapter"]), "--k", "2", "--repeats", "1", "--prompts", "4",
                 "--work", str(work), "--json", str(out)]) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize("key", ["io_floor_ratio_projection", "io_floor_ratio_full", "peak_rss_bytes",
                                 "multi_adapter_ratio", "full_s", "projection_s", "io_floor_full_s",
                                 "io_floor_projection_s", "dense_safelora_s", "lowrank_s"])
def test_bench_reports_a_positive_measurement(figures, key):
    assert figures[key] > 0


def test_bench_ratios_are_the_quotients_of_their_times(figures):
    assert figures["io_floor_ratio_full"] == pytest.approx(figures["full_s"] / figures["io_floor_full_s"])
    assert figures["io_floor_ratio_projection"] == pytest.approx(figures["projection_s"] / figures["io_floor_projection_s"])
    assert figures["multi_adapter_ratio"] == pytest.approx(figures["multi_adapter_s"] / figures["full_s"])


def test_bench_times_every_layer_and_counts_the_bytes_it_read(figures, llama_trio):
    assert len(figures["per_layer_s"]) == 5 and all(t > 0 for t in figures["per_layer_s"])
    shards = sum(p.stat().st_size for folder in ("base", "aligned") for p in llama_trio[folder].glob("*.safetensors"))
    assert 0 < figures["bytes_read_full"] <= shards
    assert 0 < figures["bytes_read_projection"] < figures["bytes_read_full"]


def test_bench_dense_safe_lora_agrees_with_the_low_rank_op(figures):
    assert figures["dense_vs_lowrank_max_rel_diff"] < 1e-4
    assert figures["multi_adapter_k"] == 2


def test_bench_times_both_fine_tuned_passes_and_its_figure_is_the_default_one(figures):
    assert figures["finetuned_pass"] == {"one": "with_calibration", "k": "after_window"}
    assert set(figures["multi_adapter_s_by_pass"]) == set(figures["full_s_by_pass"]) == {"with_calibration",
                                                                                         "after_window"}
    assert figures["multi_adapter_s"] == figures["multi_adapter_s_by_pass"]["after_window"]
    assert figures["full_s"] == figures["full_s_by_pass"]["with_calibration"]
    assert all(t > 0 for t in [*figures["multi_adapter_s_by_pass"].values(), *figures["full_s_by_pass"].values()])


def test_bench_records_the_state_each_projection_figure_was_measured_in(figures):
    warm, cold = figures["state_projection"], figures["state_projection_cold"]
    assert warm["page_cache_residency"] == pytest.approx(1.0) and cold["page_cache_residency"] == 0.0
    for state in (warm, cold, figures["state_start"]):
        assert state["torch_threads"] >= 1 and state["load_average_1m"] >= 0
    assert figures["io_floor_ratio_projection_cold"] == pytest.approx(figures["projection_cold_s"]
                                                                      / figures["io_floor_projection_cold_s"])


def test_page_cache_residency_sees_an_eviction(tmp_path):
    from mscp.harness.bench import evict, page_cache_residency

    f = tmp_path / "data.bin"
    f.write_bytes(b"x" * (1 << 20))
    f.read_bytes()
    assert page_cache_residency([f]) == pytest.approx(1.0)
    evict([f])
    assert page_cache_residency([f]) < 0.1


def test_bench_reports_the_default_score_beside_the_single_pass_one_in_time_and_passes(figures):
    assert figures["default_over_single_pass"] == pytest.approx(figures["default_s"] / figures["full_s"])
    assert 0.5 < figures["passes_full"] < 1.5  # the single-pass score: one read of both models, and the projection
    assert figures["passes_default"] > figures["passes_full"]
    assert sum(figures["passes_default_by_stage"].values()) == pytest.approx(figures["passes_default"], abs=1e-3)


def test_bench_counts_the_flops_of_both_scores(figures):
    assert figures["flops_default_over_single_pass"] == pytest.approx(figures["gflop_default"] / figures["gflop_full"])
    assert sum(figures["gflop_default_by_stage"].values()) == pytest.approx(figures["gflop_default"])
    assert figures["gflop_default"] > figures["gflop_full"] > 0  # the default adds generation and a backward pass


def test_bench_check_flags_more_passes_more_flops_and_a_time_ratio_past_its_tolerance():
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_check.py"
    spec = importlib.util.spec_from_file_location("bench_check", path)
    check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(check)
    recorded = {**{k: 1.0 for k in check.EXACT}, **{k: 4.0 for k in check.COUNTED}, **{k: 2.0 for k in check.RATIOS}}
    assert check.compare(dict(recorded), recorded, 0.3) == []
    assert check.compare({**recorded, "io_floor_ratio_full": 2.5}, recorded, 0.3) == []  # within 30 %
    assert check.compare({**recorded, "flops_default_over_single_pass": 4.03}, recorded, 0.3) == []  # within 1 %
    worse = check.compare({**recorded, "passes_default": 1.01, "flops_default_over_single_pass": 4.1,
                           "multi_adapter_ratio": 2.7}, recorded, 0.3)
    flagged = [w.split(":")[0] for w in worse]
    assert flagged == ["passes_default", "flops_default_over_single_pass", "multi_adapter_ratio"]
