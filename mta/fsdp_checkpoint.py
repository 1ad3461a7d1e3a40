"""Reload a sharded FSDP checkpoint (a Trainer checkpoint written under FSDP) into a model in one process.

Under FSDP with `fsdp_state_dict_type: SHARDED_STATE_DICT`, each Trainer checkpoint
(`--save-steps`) holds the model as a `torch.distributed.checkpoint` folder, `pytorch_model_fsdp_0/`,
whose single entry "model" is the model's state dict, every process writing its own shards; for a
PEFT model the Trainer saves the adapter alone (LoRA and the `modules_to_save` copies, as PEFT names
them). Reading it needs no process group: one process reads every shard into a whole model.
"""

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict

from .finetune_errors import FinetuneError

# Where accelerate puts the (first) model of a sharded checkpoint, and the key it stores it under.
FSDP_MODEL_FOLDER = "pytorch_model_fsdp_0"
FSDP_MODEL_KEY = "model"


def load_sharded_checkpoint(model: torch.nn.Module, checkpoint: str | Path) -> torch.nn.Module:
    """Fill `model` with the weights of a sharded FSDP checkpoint (a `checkpoint-N` folder, or its model folder).

    `model` must be built as the trained one was: the same config, and for LoRA the same PEFT wrapping
    (`mta.train_modes.prepare_for_training`) of the same base weights when the checkpoint holds the adapter
    alone. Every tensor must be in the checkpoint.
    """
    checkpoint = Path(checkpoint)
    folder = checkpoint / FSDP_MODEL_FOLDER if (checkpoint / FSDP_MODEL_FOLDER).is_dir() else checkpoint
    if not (folder / ".metadata").is_file():
        raise FinetuneError(f"{checkpoint} is not a sharded FSDP checkpoint (no {FSDP_MODEL_FOLDER}/.metadata)")
    metadata = dcp.FileSystemReader(folder).read_metadata()
    stored = {key.removeprefix(FSDP_MODEL_KEY + ".") for key in metadata.state_dict_metadata}
    if isinstance(model, PeftModel):
        adapter = get_peft_model_state_dict(model)
        if stored == set(adapter):
            dcp.load({FSDP_MODEL_KEY: adapter}, checkpoint_id=folder)
            set_peft_model_state_dict(model, adapter)
            return model
    state = model.state_dict()
    missing = sorted(set(state) - stored)
    if missing:
        raise FinetuneError(f"{folder} lacks {len(missing)} tensors of the model, e.g. {missing[:3]}: "
                            "was it saved from a model built another way (other config, LoRA or not)?")
    # In place, into the tensors of `state`, which are the model's own.
    dcp.load({FSDP_MODEL_KEY: state}, checkpoint_id=folder)
    return model
