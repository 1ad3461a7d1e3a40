"""What converters need of the MTA model's layout: tensor shapes, and a folder's config, `auto_map` and code."""

from pathlib import Path

import torch
from transformers.dynamic_module_utils import custom_object_save

from modeling_mta import MTAConfig, MTAForCausalLM


def state_dict_shapes(config: MTAConfig) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every tensor of MTAForCausalLM(config), built on the meta device (no memory)."""
    with torch.device("meta"):
        return {name: tuple(t.shape) for name, t in MTAForCausalLM(config).state_dict().items()}


def describe_mta(config: MTAConfig) -> str:
    """One line naming the MTA operations of a config."""
    return (
        f"MTA: kq conv {config.kq_conv_size} / post {config.kq_conv_post_size} in layers {config.mta_layers}, "
        f"head mix {config.head_mix_size} / post {config.head_mix_post_size}, key padding {config.key_padding!r}, "
        f"group norm {config.group_norm}, gate {config.attn_gate}"
    )


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
