"""Peak memory of `convert_llama` on a synthetic multi-GB sharded Llama checkpoint, next to its largest shard.

Writes a bf16 Llama-shaped checkpoint (Llama-2-7B widths, as many layers as fill the requested
size) to a temporary folder, converts it in a child process, and prints that process's peak
resident memory (VmHWM, Linux) beside the size of the largest input shard, and beside the peak of a
child that only imports the package and builds the config (the constant part). Everything
written is removed at the end. Needs about twice the checkpoint size of free disk.

    python benchmarks/bench_convert_memory.py                      # 3 shards of 1 GB, then 12 of 0.25 GB
    python benchmarks/bench_convert_memory.py --layout 4x0.5
"""

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import LlamaConfig, LlamaForCausalLM

from conversion.tensor_files import SAFETENSORS_INDEX, SAFETENSORS_METADATA, shard_name

GB = 1e9
WIDTHS = dict(hidden_size=4096, intermediate_size=11008, num_attention_heads=32, num_key_value_heads=32, vocab_size=32000)

# Peak RSS is read from VmHWM (Linux): ru_maxrss would carry over, through fork and exec, the
# parent's own peak, which holds a whole shard while writing the checkpoint.
CHILD = """
import re, sys, time
{setup}
start = time.perf_counter()
{work}
seconds = time.perf_counter() - start
peak_kib = re.search(r"VmHWM:\\s*(\\d+) kB", open("/proc/self/status").read()).group(1)
print(int(peak_kib) * 1024, seconds)
"""
IMPORT_ONLY = dict(setup="from conversion import convert_llama, mta_config_from_llama\n"
                         "from conversion.llama_checkpoint import read_llama_config\nfrom pathlib import Path",
                   work="mta_config_from_llama(read_llama_config(Path(sys.argv[1])))")  # fmt: skip
CONVERT = dict(setup="from conversion import convert_llama", work="convert_llama(sys.argv[1], sys.argv[2])")


def write_checkpoint(folder: Path, shards: int, shard_bytes: float) -> int:
    """A bf16 Llama checkpoint of about `shards` x `shard_bytes`; returns the largest shard's size in bytes."""
    per_layer = 2 * (4 * WIDTHS["hidden_size"] ** 2 + 3 * WIDTHS["hidden_size"] * WIDTHS["intermediate_size"])
    embeddings = 2 * 2 * WIDTHS["vocab_size"] * WIDTHS["hidden_size"]
    layers = max(1, round((shards * shard_bytes - embeddings) / per_layer))
    config = LlamaConfig(**WIDTHS, num_hidden_layers=layers, dtype="bfloat16")
    folder.mkdir()
    config.save_pretrained(folder)

    groups, group, size = [], [], 0
    with torch.device("meta"):
        shapes = {name: t.shape for name, t in LlamaForCausalLM(config).state_dict().items()}
    for name, shape in shapes.items():
        nbytes = 2 * shape.numel()
        if group and size + nbytes > shard_bytes:
            groups.append(group)
            group, size = [], 0
        group.append((name, shape))
        size += nbytes
    groups.append(group)

    weight_map, largest = {}, 0
    for number, group in enumerate(groups, start=1):
        name = shard_name(number, len(groups))
        generator = torch.Generator().manual_seed(number)
        tensors = {n: torch.randn(s, generator=generator, dtype=torch.bfloat16) for n, s in group}
        save_file(tensors, folder / name, metadata=SAFETENSORS_METADATA)
        weight_map |= dict.fromkeys(tensors, name)
        largest = max(largest, (folder / name).stat().st_size)
        del tensors
    total = sum(p.stat().st_size for p in folder.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index))
    return largest


def child_peak(script: dict, *args: Path) -> tuple[float, float]:
    """Peak RSS (bytes) and seconds of `script` run in a fresh interpreter."""
    out = subprocess.run([sys.executable, "-c", CHILD.format(**script), *map(str, args)],
                         capture_output=True, text=True, check=True).stdout  # fmt: skip
    peak, seconds = out.split()[-2:]
    return float(peak), float(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layout", nargs="+", default=["3x1", "12x0.25"], metavar="SHARDSxGB",
                        help="checkpoints to try, as number of shards x GB per shard (default 3x1 12x0.25)")
    parser.add_argument("--dir", default=tempfile.gettempdir(), help="where to write the checkpoints (default /tmp)")
    args = parser.parse_args()

    rows = []
    for layout in args.layout:
        shards, shard_gb = layout.split("x")
        work = Path(tempfile.mkdtemp(prefix="bench-convert-", dir=args.dir))
        try:
            largest = write_checkpoint(work / "llama", int(shards), float(shard_gb) * GB)
            files = sorted((work / "llama").glob("*.safetensors"))
            total = sum(p.stat().st_size for p in files)
            baseline, _ = child_peak(IMPORT_ONLY, work / "llama")
            peak, seconds = child_peak(CONVERT, work / "llama", work / "mta")
            written = sum(p.stat().st_size for p in (work / "mta").glob("*.safetensors"))
            assert written >= total, "the conversion wrote less than the checkpoint holds"
            rows.append((f"{len(files)} x {float(shard_gb):g} GB", total, largest, baseline, peak, seconds))
        finally:
            shutil.rmtree(work)

    header = ("checkpoint", "total", "largest shard", "import-only peak RSS", "conversion peak RSS",
              "peak / largest shard", "time")  # fmt: skip
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for name, total, largest, baseline, peak, seconds in rows:
        cells = (name, f"{total / GB:.2f} GB", f"{largest / GB:.2f} GB", f"{baseline / GB:.2f} GB",
                 f"{peak / GB:.2f} GB", f"{peak / largest:.2f}", f"{seconds:.0f} s")  # fmt: skip
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
