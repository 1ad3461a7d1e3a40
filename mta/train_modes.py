"""What a fine-tune trains: only the MTA parameters, every parameter, or LoRA adapters plus the MTA modules."""

from dataclasses import dataclass

import torch
from accelerate import init_empty_weights
from peft import LoraConfig, get_peft_model
from torch import nn

from modeling_mta import MTAConfig, MTAForCausalLM
from modeling_mta.modeling_mta import MTA_MODULE_NAMES, is_mta_parameter

TRAIN_MODES = ("mta", "full", "lora")
LORA_ATTENTION_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj")
LORA_MLP_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


@dataclass(frozen=True)
class LoraOptions:
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    mlp: bool = False  # also adapt the MLP projections, not only attention's


def present_mta_modules(model: nn.Module) -> list[str]:
    """The names of MTA_MODULE_NAMES that occur as attention submodules of `model`, in that order."""
    found = {path.split(".")[-1] for path, _ in model.named_modules()
             if path.count(".") >= 1 and path.split(".")[-2] == "self_attn"}  # fmt: skip
    return [name for name in MTA_MODULE_NAMES if name in found]


def lora_config(model: nn.Module, options: LoraOptions) -> LoraConfig:
    """LoRA on the projections; the MTA modules train in full beside it (PEFT's `modules_to_save`)."""
    targets = LORA_ATTENTION_PROJECTIONS + (LORA_MLP_PROJECTIONS if options.mlp else ())
    return LoraConfig(
        task_type="CAUSAL_LM",
        r=options.rank,
        lora_alpha=options.alpha,
        lora_dropout=options.dropout,
        target_modules=list(targets),
        modules_to_save=present_mta_modules(model) or None,
    )


def prepare_for_training(model: nn.Module, mode: str, lora: LoraOptions = LoraOptions()) -> nn.Module:
    """The model to hand to the Trainer: `model` with only the parameters of `mode` trainable, or its PEFT wrapper."""
    if mode == "full":
        return model.requires_grad_(True)
    if mode == "mta":
        for name, param in model.named_parameters():
            param.requires_grad_(is_mta_parameter(name))
        if not any(param.requires_grad for param in model.parameters()):
            raise ValueError("the model has no MTA parameters to train (no mta_layers, head mixing, group norm or "
                             "gate): use --train full or --train lora")
        return model
    if mode == "lora":
        return get_peft_model(model, lora_config(model, lora))
    raise ValueError(f"the training mode must be one of {TRAIN_MODES}, got {mode!r}")


def trainable_summary(model: nn.Module) -> str:
    """One line: how many parameters train, of how many."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"trainable parameters: {trainable:,} of {total:,} ({100 * trainable / total:.3f}%)"


def model_from_state_dict(config: MTAConfig, mode: str, lora: LoraOptions,
                          state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """The model `prepare_for_training(MTAForCausalLM(config), mode, lora)` holding `state_dict`'s tensors (not copies).

    This is how one process gets a plain model back from a training run whose parameters were
    sharded (FSDP): the state dict gathered from the shards goes into a skeleton built without memory.
    """
    with init_empty_weights():  # parameters on the meta device; buffers (RoPE frequencies) real
        model = prepare_for_training(MTAForCausalLM(config), mode, lora)
    model.load_state_dict(state_dict, strict=True, assign=True)
    base = model.get_base_model() if mode == "lora" else model
    if config.tie_word_embeddings:
        base.tie_weights()
    return model
