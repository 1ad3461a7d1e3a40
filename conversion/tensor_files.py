"""Checkpoint tensor files, read without ever unpickling arbitrary objects and written as safetensors.

Reading accepts safetensors and torch files (through `torch.load(weights_only=True)`, which only
rebuilds tensors and plain containers). Safetensors tensors are copied byte range by byte range,
so copying a shard needs a few MiB of memory whatever its size.
"""

import json
import struct
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .errors import ConversionError
from .json_files import read_json_object

SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_INDEX = "pytorch_model.bin.index.json"
SINGLE_FILES = ("model.safetensors", "pytorch_model.bin")
SAFETENSORS_METADATA = {"format": "pt"}  # what Transformers writes, and checks for, in every shard

# safetensors' dtype names -> torch's.
SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8,
    "U64": torch.uint64, "U32": torch.uint32, "U16": torch.uint16, "U8": torch.uint8, "BOOL": torch.bool,
}  # fmt: skip
COPY_CHUNK_BYTES = 16 << 20


@dataclass(frozen=True)
class TensorSpec:
    dtype: torch.dtype
    shape: tuple[int, ...]


def is_safetensors(path: Path) -> bool:
    return path.suffix == ".safetensors"


def weight_files(folder: Path) -> list[Path]:
    """The weight files of a Transformers model folder: those its index names, or its single weight file."""
    for index_name in (SAFETENSORS_INDEX, TORCH_INDEX):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = read_json_object(index_path, "").get("weight_map")
            if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
                raise ConversionError(f"{index_path} has no weight_map naming a file for each tensor")
            names = sorted(set(weight_map.values()))
            absent = [name for name in names if not (folder / name).is_file()]
            if absent:
                raise ConversionError(f"{index_path} names weight files that are not in {folder}: {absent}")
            return [folder / name for name in names]
    for name in SINGLE_FILES:
        if (folder / name).is_file():
            return [folder / name]
    raise ConversionError(f"no weights in {folder}: expected {SAFETENSORS_INDEX}, {TORCH_INDEX} or one of {SINGLE_FILES}")


def read_tensor_specs(path: Path) -> dict[str, TensorSpec]:
    """Name -> dtype and shape of every tensor in a weight file; a truncated or corrupt file is an error."""
    if is_safetensors(path):
        try:
            with safe_open(path, framework="pt") as file:  # checks the header against the file size
                slices = {name: file.get_slice(name) for name in file.keys()}
                raw = {name: (s.get_dtype(), tuple(s.get_shape())) for name, s in slices.items()}
        except (SafetensorError, OSError) as error:
            raise ConversionError(f"{path} is truncated or not a safetensors file ({error})") from error
        unknown = {dtype for dtype, _ in raw.values()} - set(SAFETENSORS_DTYPES)
        if unknown:
            raise ConversionError(f"{path} holds tensors of dtypes this converter does not know: {sorted(unknown)}")
        return {name: TensorSpec(SAFETENSORS_DTYPES[dtype], shape) for name, (dtype, shape) in raw.items()}
    return {name: TensorSpec(t.dtype, tuple(t.shape)) for name, t in as_state_dict(load_torch_file(path), path).items()}


def load_torch_file(path: Path) -> object:
    """A torch-saved object, memory-mapped; anything but tensors and plain containers is refused."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except Exception as error:  # torch raises several types for truncated zips and refused pickles alike
        raise ConversionError(f"{path} is truncated, not a torch file, or holds more than tensors ({error})") from error


def as_state_dict(loaded: object, path: Path) -> dict[str, torch.Tensor]:
    """`loaded` if it is a dict of tensors (a state dict); an error naming `path` otherwise."""
    if not isinstance(loaded, dict) or not all(isinstance(t, torch.Tensor) for t in loaded.values()):
        raise ConversionError(f"{path} does not hold a dict of tensors (a state dict)")
    return loaded


def copy_safetensors(src: Path, dst: Path, names: list[str]) -> int:
    """Copy the tensors `names` of safetensors file `src` into a new file `dst`, bytes unchanged; returns their bytes.

    The header is rewritten for the kept tensors and each tensor's bytes are copied in chunks, so
    memory stays flat however large the file is.
    """
    with open(src, "rb") as source:
        (header_len,) = struct.unpack("<Q", source.read(8))
        header = json.loads(source.read(header_len))
        data_start = 8 + header_len
        kept = sorted(names, key=lambda name: header[name]["data_offsets"][0])
        new_header, offset = {"__metadata__": header.get("__metadata__", SAFETENSORS_METADATA)}, 0
        for name in kept:
            begin, end = header[name]["data_offsets"]
            new_header[name] = {"dtype": header[name]["dtype"], "shape": header[name]["shape"],
                                "data_offsets": [offset, offset + end - begin]}  # fmt: skip
            offset += end - begin
        encoded = json.dumps(new_header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # keeps the tensor data 8-byte aligned, as safetensors does
        with open(dst, "xb") as target:
            target.write(struct.pack("<Q", len(encoded)) + encoded)
            for name in kept:
                begin, end = header[name]["data_offsets"]
                source.seek(data_start + begin)
                _copy_bytes(source, target, end - begin)
    return offset


def _copy_bytes(source, target, count: int) -> None:
    while count:
        chunk = source.read(min(count, COPY_CHUNK_BYTES))
        if not chunk:
            raise ConversionError(f"{source.name} ended early: truncated while being read?")
        target.write(chunk)
        count -= len(chunk)


def save_tensors(tensors: dict[str, torch.Tensor], path: Path) -> int:
    """Write tensors as one safetensors file; returns their bytes."""
    save_file({name: t.contiguous() for name, t in tensors.items()}, path, metadata=SAFETENSORS_METADATA)
    return sum(t.numel() * t.element_size() for t in tensors.values())


def write_index(folder: Path, weight_map: dict[str, str], total_size: int) -> None:
    """The `model.safetensors.index.json` through which Transformers loads a sharded folder."""
    index = {"metadata": {"total_size": total_size}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2) + "\n")


def shard_name(number: int, count: int) -> str:
    return f"model-{number:05d}-of-{count:05d}.safetensors"

