"""The model card (README.md) of a Hub-ready MTA folder: the recipe, the layers, the base model, how to load it."""

import re

from modeling_mta import MTAConfig

from .text_data import ByteTokens

# Shown in the card's recipe table, in this order: every MTA field of MTA_SPEC section 9.
RECIPE_FIELDS = ("mta_layers", "kq_conv_size", "kq_conv_post_size", "key_padding", "head_mix_size",
                 "head_mix_post_size", "group_norm", "group_norm_depth_scaling", "attn_gate", "mta_init")
# What the Hub accepts as `base_model` metadata: an owner/name repository id (a local path is not one).
HUB_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _recipe_rows(config: MTAConfig) -> list[str]:
    return [f"| `{name}` | `{getattr(config, name)}` |" for name in RECIPE_FIELDS]


def _architecture(config: MTAConfig) -> str:
    tied = "tied" if config.tie_word_embeddings else "untied"
    return (f"Llama architecture: {config.num_hidden_layers} layers, hidden size {config.hidden_size}, "
            f"{config.num_attention_heads} attention heads ({config.num_key_value_heads} key/value heads), "
            f"head dim {config.head_dim}, vocabulary {config.vocab_size}, {tied} embeddings.")


def _where_mta_acts(config: MTAConfig) -> str:
    convolutions = [f"{where}-softmax {size[0]} x {size[1]}"
                    for where, size in (("pre", config.kq_conv_size), ("post", config.kq_conv_post_size)) if size]
    lines = []
    if convolutions and config.mta_layers:
        lines.append(f"- Key-query convolutions ({', '.join(convolutions)}; queries x keys) in layers "
                     f"{', '.join(map(str, config.mta_layers))} (0-based).")
    else:
        lines.append("- No key-query convolution.")
    every_layer = []
    if config.head_mix_size:
        every_layer.append(f"pre-softmax head mixing in groups of {config.head_mix_size}")
    if config.head_mix_post_size:
        every_layer.append(f"post-softmax head mixing in groups of {config.head_mix_post_size}")
    if config.group_norm:
        every_layer.append("group norm" + (" with depth scaling" if config.group_norm_depth_scaling else ""))
    if config.attn_gate:
        every_layer.append(f"{config.attn_gate} output gate")
    if every_layer:
        lines.append(f"- In every layer: {'; '.join(every_layer)}.")
    return "\n".join(lines)


def model_card(config: MTAConfig, *, base_model: str, tokenizer: str, training: list[str],
               repo_id: str | None = None, has_adapter: bool = False) -> str:
    """README.md text for a model folder. `training` holds Markdown lines saying how it was trained."""
    where = repo_id or "path/to/this/folder"
    metadata = ["library_name: transformers", "pipeline_tag: text-generation",
                "tags:", "- multi-token-attention", "- mta", "- custom_code"]
    if HUB_REPO_ID.match(base_model):
        metadata.append(f"base_model: {base_model}")
    if tokenizer == ByteTokens.name:
        tokenizer_text = ("There is no tokenizer: token ids are the UTF-8 bytes of the text (id = byte value), "
                          "e.g. `torch.tensor([list('text'.encode())])`.")
    else:
        tokenizer_text = f"The tokenizer ({tokenizer}) is in this folder: `AutoTokenizer.from_pretrained(\"{where}\")`."
    adapter_text = ""
    if has_adapter:
        adapter_text = f"""
The weights here have the LoRA adapter merged in. The adapter itself, with the trained MTA modules
(PEFT `modules_to_save`), is in `adapter/`; it applies to the base model converted the same way:

```python
from peft import PeftModel
model = PeftModel.from_pretrained(base_mta_model, "{where}", subfolder="adapter")
```
"""
    return f"""---
{chr(10).join(metadata)}
---

# Multi-Token Attention model

A causal language model with Multi-Token Attention (MTA, [arXiv 2504.00927](https://arxiv.org/abs/2504.00927)):
attention weights that depend on several queries, keys and heads at once, through small
convolutions over each head's score map and mixing across groups of heads.

## MTA recipe

{_where_mta_acts(config)}

| field | value |
|---|---|
{chr(10).join(_recipe_rows(config))}

{_architecture(config)}

## Base model

{base_model}

## How it was trained

{chr(10).join(training)}

## How to load

The model code (`configuration_mta.py`, `modeling_mta.py` and the files they import) is in this
folder, and `config.json` maps the Auto classes to it, so Transformers loads it without any other
package; `trust_remote_code=True` lets it run that code (read it first):

```python
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained("{where}", trust_remote_code=True)
```

{tokenizer_text}
{adapter_text}"""
