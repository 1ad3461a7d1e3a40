"""The model-level benchmark script runs end to end (tiny model, CPU); its numbers come from GPU runs."""

import json

from benchmarks import bench_model


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
