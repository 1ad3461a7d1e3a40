"""Convert a consolidated checkpoint of the official MTA code (lingua) into an MTA model folder.

Two conventions differ from this model's and are converted here:
- Rotary embedding: lingua rotates adjacent dimensions (2i, 2i+1) of each head together (the
  complex-number form); Transformers' Llama rotates (i, i + head_dim/2). Reordering the rows of
  the q and k projections the same way maps one onto the other and leaves every q.k unchanged.
- Linear head mixing (`wpsm`, `wposm`): nn.Linear over the head axis, out[e] = sum_c W[e, c] x[c];
  this model's head mix is X'[e] = sum_c X[c] W[c, e] (MTA_SPEC section 3), so W goes in transposed
  as the single group of a full mix. `head_kernel` already has this layout and is copied as is.
"""

import re
from dataclasses import dataclass
from pathlib import Path

import torch

from modeling_mta import MTAConfig

from .errors import ConversionError
from .lingua_config import mta_config_from_lingua, read_lingua_params
from .mta_folder import describe_mta, save_config_and_code, state_dict_shapes
from .safe_output import check_output_folder, staged_output
from .tensor_files import as_state_dict, load_torch_file, save_tensors

CHECKPOINT_FILE = "consolidated.pth"
TOP_LEVEL_NAMES = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight",
                   "output.weight": "lm_head.weight"}  # fmt: skip
LAYER_NAMES = {
    "attention.wq.weight": "self_attn.q_proj.weight",
    "attention.wk.weight": "self_attn.k_proj.weight",
    "attention.wv.weight": "self_attn.v_proj.weight",
    "attention.wo.weight": "self_attn.o_proj.weight",
    "feed_forward.w1.weight": "mlp.gate_proj.weight",
    "feed_forward.w3.weight": "mlp.up_proj.weight",
    "feed_forward.w2.weight": "mlp.down_proj.weight",
    "attention_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "attention.mta_kernel": "self_attn.kq_conv.weight",
    "attention.mta_kernel_after_sm": "self_attn.kq_conv_post.weight",
    "attention.wpsm.weight": "self_attn.head_mix.weight",
    "attention.head_kernel": "self_attn.head_mix_post.weight",
    "attention.wposm.weight": "self_attn.head_mix_post.weight",
    "attention.subln.weight": "self_attn.group_norm.weight",
    "attention.gate.weight": "self_attn.gate.weight",
    "attention.gate.bias": "self_attn.gate.bias",
}
ROTARY_PROJECTIONS = ("attention.wq.weight", "attention.wk.weight")
LINEAR_HEAD_MIXES = ("attention.wpsm.weight", "attention.wposm.weight")
# With weight_tying the output layer has no weight of its own; a consolidated state dict may still
# list the embedding under these names.
TIED_OUTPUT_NAMES = ("output.weight", "output.tied_module.weight")


@dataclass
class LinguaConversion:
    dst: Path
    config: MTAConfig
    tensors: int
    dtype: torch.dtype

    def summary(self) -> str:
        dtype = str(self.dtype).removeprefix("torch.")
        return f"wrote {self.dst}: {self.tensors} tensors ({dtype}) in model.safetensors\n{describe_mta(self.config)}"


def read_lingua_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """The model state dict in `folder`/consolidated.pth: its "model" entry, or the whole file if it is one."""
    path = folder / CHECKPOINT_FILE
    if not path.is_file():
        raise ConversionError(f"{folder} has no {CHECKPOINT_FILE}: consolidate the checkpoint with lingua first")
    loaded = load_torch_file(path)
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        loaded = loaded["model"]
    return as_state_dict(loaded, path)


def halves_from_pairs(weight: torch.Tensor, head_dim: int) -> torch.Tensor:
    """A q/k projection with each head's rows reordered from adjacent-pair rotary order to rotate-half order.

    Row 2i of a head moves to i and row 2i+1 to i + head_dim/2: the pair that lingua rotates together
    becomes the pair that Transformers rotates together, with the same frequency.
    """
    rows, cols = weight.shape
    return weight.reshape(rows // head_dim, head_dim // 2, 2, cols).transpose(1, 2).reshape(rows, cols)


def mta_state_dict(state: dict[str, torch.Tensor], config: MTAConfig) -> dict[str, torch.Tensor]:
    """The lingua state dict under this model's names and conventions, every name and shape checked."""
    expected = state_dict_shapes(config)
    if config.tie_word_embeddings:
        del expected["lm_head.weight"]
        state = {name: t for name, t in state.items() if name not in TIED_OUTPUT_NAMES}
    converted, unknown, wrong = {}, [], []
    for name, tensor in state.items():
        match = re.fullmatch(r"layers\.(\d+)\.(.+)", name)
        local = match.group(2) if match else name
        target = (f"model.layers.{match.group(1)}.{LAYER_NAMES[local]}" if match and local in LAYER_NAMES
                  else TOP_LEVEL_NAMES.get(name))  # fmt: skip
        if target not in expected:
            unknown.append(name)
            continue
        if local in LINEAR_HEAD_MIXES:
            tensor = tensor.T[None]
        if tuple(tensor.shape) != expected[target]:
            wrong.append(f"{name} is {list(tensor.shape)}, params.json gives {list(expected[target])}")
            continue
        if local in ROTARY_PROJECTIONS:
            tensor = halves_from_pairs(tensor, config.head_dim)
        converted[target] = tensor.contiguous()
    missing = sorted(set(expected) - set(converted))
    problems = [f"unexpected tensors {unknown[:8]}"] if unknown else []
    problems += [f"missing tensors (named as in this model) {missing[:8]}"] if missing else []
    problems += wrong[:8]
    if problems:
        raise ConversionError("consolidated.pth does not match params.json: " + "; ".join(problems))
    return converted


def convert_lingua(src: str | Path, dst: str | Path, *, overwrite: bool = False) -> LinguaConversion:
    """Write an MTA model folder at `dst` from the consolidated lingua checkpoint folder `src`; `src` is only read.

    Raises ConversionError, having written nothing, for any bad input.
    """
    src, dst = Path(src), Path(dst)
    check_output_folder(src, dst, overwrite)
    config = mta_config_from_lingua(read_lingua_params(src))
    tensors = mta_state_dict(read_lingua_state_dict(src), config)
    dtype = tensors["model.embed_tokens.weight"].dtype
    with staged_output(src, dst, overwrite) as staging:
        save_tensors(tensors, staging / "model.safetensors")
        save_config_and_code(config, staging, dtype)
    return LinguaConversion(dst=dst, config=config, tensors=len(tensors), dtype=dtype)
