"""examples/distributed_check.py on the CPU: 2 DDP processes (gloo) follow 1 process with the same global batch."""

import json
import shutil

import pytest
import torch
import torch.distributed.checkpoint as dcp

from examples import distributed_check
from mta import demo
from mta.fsdp_checkpoint import FSDP_MODEL_FOLDER
from mta.hub_folder import save_hub_folder
from mta.train_modes import prepare_for_training

from .tiny import random_mta_model
from .trainer_helpers import ALL_MTA_OPS


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


@pytest.mark.parametrize("mode", ["full", "lora"])
def test_the_reload_check_compares_the_checkpoint_with_the_written_folder(tmp_path, mode):
    """The GPU-only FSDP reload step, fed a checkpoint in the same format written by one process."""
    torch.manual_seed(0)
    trained = prepare_for_training(random_mta_model(**ALL_MTA_OPS), mode)
    with torch.no_grad():
        for name, param in trained.named_parameters():
            if "lora_B" in name:
                param.normal_(std=0.1)  # a LoRA update that merging must carry
    checkpoint = tmp_path / "fsdp-checkpoints" / "checkpoint-3" / FSDP_MODEL_FOLDER
    dcp.save({"model": trained.state_dict()}, checkpoint_id=checkpoint)
    save_hub_folder(trained, tmp_path / "fsdp", card="card")
    assert distributed_check.reload_check(tmp_path, 3, mode)["max_abs_logit_diff"] <= 1e-5

    other = prepare_for_training(random_mta_model(seed=1, **ALL_MTA_OPS), mode)  # other weights must show up
    shutil.rmtree(checkpoint)
    dcp.save({"model": other.state_dict()}, checkpoint_id=checkpoint)
    assert distributed_check.reload_check(tmp_path, 3, mode)["max_abs_logit_diff"] > 1e-3
