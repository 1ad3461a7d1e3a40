"""In-memory retrofit: a Llama model or config becomes an MTA one with identity MTA parameters."""

import warnings

import torch
from transformers import LlamaConfig, PreTrainedConfig

from modeling_mta import MTAConfig, MTAForCausalLM
from modeling_mta.configuration_mta import paper_mta_layers
from modeling_mta.modeling_mta import is_mta_parameter

# The paper's recipe without its two non-identity parts (group norm and gate), so that the
# retrofitted model starts out computing exactly what the Llama computed.
RETROFIT_DEFAULTS = dict(
    kq_conv_size=[6, 11],
    kq_conv_post_size=None,
    key_padding="both",
    head_mix_size=None,
    head_mix_post_size=2,
    group_norm=False,
    group_norm_depth_scaling=True,
    attn_gate=None,
    mta_init="identity",
)

# Keys of a saved config that describe the file or the class, not the model.
_NOT_MODEL_FIELDS = ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path")


def mta_config_from_llama(llama_config: LlamaConfig | PreTrainedConfig, **mta_options) -> MTAConfig:
    """Every field of `llama_config`, plus the MTA fields: `RETROFIT_DEFAULTS` overridden by `mta_options`.

    `mta_layers` defaults to every 4th layer (2, 6, 10, ...), as in the paper.
    """
    unknown = set(mta_options) - set(RETROFIT_DEFAULTS) - {"mta_layers"}
    if unknown:
        raise ValueError(f"unknown MTA options {sorted(unknown)}; known are {sorted(RETROFIT_DEFAULTS)} and mta_layers")
    fields = {k: v for k, v in llama_config.to_dict().items() if k not in _NOT_MODEL_FIELDS}
    options = {**RETROFIT_DEFAULTS, "mta_layers": paper_mta_layers(llama_config.num_hidden_layers), **mta_options}
    if options["group_norm"] or options["attn_gate"] is not None:
        warnings.warn(
            "group_norm / attn_gate are not identity operations: the retrofitted model will not compute "
            "what the Llama computed until it is fine-tuned",
            stacklevel=2,
        )
    return MTAConfig(**fields, **options)


def retrofit_llama(llama_model: torch.nn.Module, **mta_options) -> MTAForCausalLM:
    """An MTAForCausalLM holding `llama_model`'s weights (shared, not copied) and identity MTA parameters."""
    config = mta_config_from_llama(llama_model.config, **mta_options)
    reference = next(llama_model.parameters())
    with torch.device(reference.device):
        model = MTAForCausalLM(config).to(reference.dtype)
    missing, unexpected = model.load_state_dict(llama_model.state_dict(), strict=False, assign=True)
    not_mta = [name for name in missing if not is_mta_parameter(name)]
    if unexpected or not_mta:
        raise ValueError(f"Llama weights do not fit the MTA model: missing {not_mta}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model.train(llama_model.training)
