"""examples/distributed_check.py on the CPU: 2 DDP processes (gloo) follow 1 process with the same global batch."""

import json

import torch

from examples import distributed_check
from mta import demo


def test_two_ddp_processes_follow_one_process_with_the_same_global_batch(tmp_path):
    (tmp_path / "notes.txt").write_text(demo.TEXT * 6)
    out = tmp_path / "out"
    status = distributed_check.main([
        "--out", str(out), "--processes", "2", "--global-batch", "4", "--steps", "4", "--loss-tolerance", "1e-5",
        "--", "--tiny", "--data", str(tmp_path / "notes.txt"), "--block-size", "32", "--train", "lora",
        "--gradient-checkpointing", "--lr", "1e-2", "--data-cache", str(tmp_path / "cache"),
    ])
    report = json.loads((out / "distributed_check.json").read_text())
    assert status == 0 and report["within_tolerance"]
    assert report["steps"] == [1, 2, 3, 4]
    ddp = report["runs"]["ddp"]
    assert ddp["world_size"] == 2 and report["runs"]["one"]["world_size"] == 1
    assert ddp["max_abs_loss_diff"] <= 1e-5 and ddp["final_weights_max_rel_diff"] <= 1e-4
    assert report["losses"]["one"][-1] < report["losses"]["one"][0]
    if not torch.cuda.is_available():
        assert ddp["distributed_type"] == "MULTI_CPU" and "fsdp" not in report["runs"]
        assert any("fsdp not run" in note for note in report["notes"])
    assert len(list(out.iterdir())) <= 8
