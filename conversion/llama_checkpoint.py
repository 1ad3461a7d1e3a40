"""A Hugging Face Llama folder as a conversion reads it: config and weight files, all checked up front.

Everything here reads headers only (safetensors) or memory-maps (torch files), so a bad
checkpoint is reported before a byte of output is written.
"""

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig

from .errors import ConversionError
from .json_files import read_json_object
from .tensor_files import TensorSpec, read_tensor_specs, weight_files

SUPPORTED_MODEL_TYPES = ("llama",)
# Buffers that older Transformers versions saved with Llama weights; the model recomputes them.
DROPPED_SUFFIXES = (".rotary_emb.inv_freq",)
MAX_LISTED = 8  # names shown in an error message


@dataclass
class LlamaWeights:
    """The weight files of a checked checkpoint and the tensors to take from each."""

    files: list[tuple[Path, list[str]]]
    dtype: torch.dtype  # of the token embedding: the checkpoint's dtype
    dropped: list[str]


def read_llama_config(folder: Path) -> LlamaConfig:
    """The folder's config.json as a LlamaConfig; a missing, unreadable or non-Llama config is an error."""
    if not folder.is_dir():
        raise ConversionError(f"the source {folder} is not a folder")
    path = folder / "config.json"
    raw = read_json_object(path, "is it a Transformers model folder?")
    model_type = raw.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConversionError(
            f"{path} has model_type {model_type!r}; this converter supports {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    try:
        return LlamaConfig.from_dict(raw)
    except Exception as error:  # the strict config raises its own validation error types
        raise ConversionError(f"{path} is not a valid Llama config: {error}") from error


def check_llama_weights(
    folder: Path, expected: dict[str, tuple[int, ...]], optional: tuple[str, ...] = ()
) -> LlamaWeights:
    """Check that the folder's weight files hold exactly the tensors `expected` (name -> shape).

    Tensors named in `optional` (a tied lm_head) or ending in DROPPED_SUFFIXES are left out if present.
    """
    files, found, dropped = [], {}, []
    for path in weight_files(folder):
        specs = read_tensor_specs(path)
        dropped += [name for name in specs if name in optional or name.endswith(DROPPED_SUFFIXES)]
        kept = [name for name in specs if name not in dropped]
        twice = [name for name in kept if name in found]
        if twice:
            raise ConversionError(f"tensors stored in more than one file: {twice[:MAX_LISTED]}")
        found.update({name: specs[name] for name in kept})
        if kept:
            files.append((path, kept))
    _check_names_and_shapes(folder, found, expected)
    embedding = found["model.embed_tokens.weight"]
    return LlamaWeights(files=files, dtype=embedding.dtype, dropped=dropped)


def _check_names_and_shapes(folder: Path, found: dict[str, TensorSpec], expected: dict[str, tuple[int, ...]]):
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    if missing or unexpected:
        raise ConversionError(
            f"the weights in {folder} are not the Llama that config.json describes: "
            f"missing {_listing(missing)}, unexpected {_listing(unexpected)}"
        )
    wrong = [f"{name} is {list(found[name].shape)}, config says {list(shape)}"
             for name, shape in expected.items() if found[name].shape != shape]  # fmt: skip
    if wrong:
        raise ConversionError(f"tensor shapes disagree with {folder / 'config.json'}: " + "; ".join(wrong[:MAX_LISTED]))


def _listing(names: list[str]) -> str:
    if not names:
        return "none"
    more = f" and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else ""
    return f"{names[:MAX_LISTED]}{more}"
