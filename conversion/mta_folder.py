"""The parts of a converted MTA model folder besides the weights: config with `auto_map`, and the code files."""

from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save

from modeling_mta import MTAConfig, MTAForCausalLM


def save_config_and_code(config: MTAConfig, folder: Path, dtype: torch.dtype) -> None:
    """Write config.json and the code files that `trust_remote_code=True` loads, as `save_pretrained` would.

    `custom_object_save` copies a class's file and its relative imports and records the class in
    `auto_map`; it needs instances, so the model is built on the meta device (no memory).
    """
    config.architectures = [MTAForCausalLM.__name__]
    config.dtype = dtype
    with torch.device("meta"):
        model = MTAForCausalLM(config)
    for auto_class_instance in (model, model.model):  # AutoModelForCausalLM, AutoModel
        custom_object_save(auto_class_instance, folder, config=config)
    config.save_pretrained(folder)  # also records AutoConfig
