"""The benchmark scripts run end to end (tiny shapes, CPU); their numbers come from GPU runs."""

import json

from benchmarks import bench_group_norm, bench_model


def test_bench_model_measures_both_models_in_both_tasks(tmp_path):
    out = tmp_path / "rows.json"
    rows = bench_model.main(["--size", "tiny", "--device", "cpu", "--contexts", "32", "--tokens-per-step", "64",
                             "--steps", "1", "--prompt", "8", "--new-tokens", "3", "--generate-batches", "2",
                             "--out", str(out)])
    assert [(r["model"], r["task"], r["batch"]) for r in rows] == [
        ("llama", "train", 2), ("mta", "train", 2), ("llama", "generate", 2), ("mta", "generate", 2)]
    assert all(r["tokens_per_s"] > 0 for r in rows)
    assert [r["ratio_to_llama"] for r in rows if r["model"] == "llama"] == [1.0, 1.0]
    assert json.loads(out.read_text())["rows"] == rows


def test_bench_group_norm_times_both_paths_against_the_reference(tmp_path):
    out = tmp_path / "rows.json"
    rows = bench_group_norm.main(["--device", "cpu", "--shapes", "1x8x2x16", "--repeats", "1", "--out", str(out)])
    assert json.loads(out.read_text()) == rows
    assert [r["path"] for r in rows] == ["torch", "triton"]
    assert all(r["event_ms"] > 0 and r["error_out"] < 2e-2 and r["error_dx"] < 2e-2 for r in rows)
