"""Convert a Llama checkpoint folder into an MTA folder that computes exactly what the Llama computed.

The Llama tensors are copied shard by shard with their bytes unchanged; the new MTA parameters
(identity kernels and head mixing) go into one extra shard. Input is checked completely before
anything is written, and the output appears all at once (see `safe_output`).
"""

import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub.errors import StrictDataclassError
from tqdm.auto import tqdm

from modeling_mta import MTAConfig
from modeling_mta.modeling_mta import is_mta_parameter, mta_modules

from .errors import ConversionError
from .llama_checkpoint import check_llama_weights, read_llama_config
from .mta_folder import describe_mta, save_config_and_code, state_dict_shapes
from .retrofit import mta_config_from_llama
from .safe_output import check_output_folder, staged_output
from .tensor_files import (
    as_state_dict,
    copy_safetensors,
    is_safetensors,
    load_torch_file,
    save_tensors,
    shard_name,
    write_index,
)

NEW_PARAMETER_DTYPES = ("float32", "bfloat16", "float16")
# Top-level files of the source that are not copied: weights, their indexes, code, and the config (rewritten).
NOT_COPIED_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".index.json", ".py", ".pyc")


@dataclass
class LlamaConversion:
    dst: Path
    config: MTAConfig
    llama_tensors: int
    new_tensors: int
    new_dtype: torch.dtype
    shards: int
    dropped: list[str]

    def summary(self) -> str:
        lines = [
            f"wrote {self.dst}: {self.llama_tensors} Llama tensors (unchanged) and {self.new_tensors} new MTA tensors "
            f"({str(self.new_dtype).removeprefix('torch.')}, identity) in {self.shards} safetensors shards",
            describe_mta(self.config),
        ]
        if self.dropped:
            lines.append(f"left out {len(self.dropped)} tensors the model recomputes or ties: {self.dropped[:4]}")
        return "\n".join(lines)


def convert_llama(
    src: str | Path,
    dst: str | Path,
    *,
    overwrite: bool = False,
    new_dtype: torch.dtype | str | None = None,
    **mta_options,
) -> LlamaConversion:
    """Write an MTA model folder at `dst` from the Llama folder `src`; `src` is only read.

    `mta_options` are MTAConfig's MTA fields (`mta_layers`, `kq_conv_size`, ...); those not given
    take `RETROFIT_DEFAULTS`. `new_dtype` is the dtype of the new MTA parameters (default: the
    checkpoint's). Raises ConversionError, having written nothing, for any bad input or option.
    """
    src, dst = Path(src), Path(dst)
    check_output_folder(src, dst, overwrite)
    config = _mta_config(read_llama_config(src), mta_options)
    shapes = state_dict_shapes(config)
    llama_shapes = {name: shape for name, shape in shapes.items() if not is_mta_parameter(name)}
    tied = ("lm_head.weight",) if config.tie_word_embeddings else ()
    for name in tied:
        del llama_shapes[name]
    weights = check_llama_weights(src, llama_shapes, optional=tied)
    new_dtype = _new_dtype(new_dtype, weights.dtype)
    new_tensors = identity_mta_tensors(config, new_dtype)
    side_files = [p for p in sorted(src.iterdir()) if p.is_file() and not p.name.startswith(".")
                  and p.name != "config.json" and not p.name.endswith(NOT_COPIED_SUFFIXES)]  # fmt: skip

    shards = len(weights.files) + bool(new_tensors)
    with staged_output(src, dst, overwrite) as staging:
        weight_map, total_bytes = {}, 0
        progress = tqdm(weights.files, desc="copying Llama shards", unit="shard")
        for number, (path, names) in enumerate(progress, start=1):
            shard = shard_name(number, shards)
            if is_safetensors(path):
                total_bytes += copy_safetensors(path, staging / shard, names)
            else:
                tensors = as_state_dict(load_torch_file(path), path)
                total_bytes += save_tensors({name: tensors[name] for name in names}, staging / shard)
            weight_map.update(dict.fromkeys(names, shard))
        if new_tensors:
            shard = shard_name(shards, shards)
            total_bytes += save_tensors(new_tensors, staging / shard)
            weight_map.update(dict.fromkeys(new_tensors, shard))
        write_index(staging, weight_map, total_bytes)
        save_config_and_code(config, staging, weights.dtype)
        for path in side_files:
            shutil.copy2(path, staging / path.name)
    return LlamaConversion(
        dst=dst, config=config, llama_tensors=len(weight_map) - len(new_tensors), new_tensors=len(new_tensors),
        new_dtype=new_dtype, shards=shards, dropped=weights.dropped,
    )  # fmt: skip


def identity_mta_tensors(config: MTAConfig, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Every MTA parameter of the model at its initial value (identity kernels and mixing), by state-dict name."""
    tensors = {}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # a gate (not identity, random init) is then the same on every run
        for layer in range(config.num_hidden_layers):
            for module_name, module in mta_modules(config, layer).items():
                module.init_weights(config.initializer_range)
                for param_name, param in module.named_parameters():
                    tensors[f"model.layers.{layer}.self_attn.{module_name}.{param_name}"] = param.detach().to(dtype)
    return tensors


def _mta_config(llama_config, mta_options: dict) -> MTAConfig:
    try:
        return mta_config_from_llama(llama_config, **mta_options)
    except (ValueError, TypeError, StrictDataclassError) as error:
        raise ConversionError(f"the MTA options do not fit this Llama: {error}") from error


def _new_dtype(requested: torch.dtype | str | None, checkpoint_dtype: torch.dtype) -> torch.dtype:
    if requested is None:
        return checkpoint_dtype
    name = str(requested).removeprefix("torch.")
    if name not in NEW_PARAMETER_DTYPES:
        raise ConversionError(f"new_dtype must be one of {NEW_PARAMETER_DTYPES}, got {requested!r}")
    return getattr(torch, name)
