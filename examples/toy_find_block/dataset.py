"""The seeded train and test sets, cached on disk, and the order in which training reads them.

Like the official toy task, one data set (one seed) serves every model and seed: the test set is
the first `test_size` distinct examples of the seeded stream, the train set the next `train_size`.
"Distinct" compares the blocks (what precedes "#"), so no train example shares its blocks with a
test example, or with another train example.

The stream is made in chunks, each from its own seed, so any number of worker processes makes
the same data. `python -m examples.toy_find_block.dataset` makes a data set from the command line:
then the worker processes import only this light module, not the caller's torch and transformers.
"""

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

from .task import BLOCKS_LENGTH, SEQUENCE_LENGTH, generate_examples

CHUNK_SIZE = 10_000
FORMAT_VERSION = 1
# Random odd weights of a 64-bit polynomial hash of the blocks. Equal blocks always hash equal, so
# no repeat can slip through; a chance collision only drops an example that was in fact new.
_HASH_WEIGHTS = np.random.default_rng(20250401).integers(0, 2**63, size=BLOCKS_LENGTH, dtype=np.uint64) * 2 + 1


def _chunk(seed: int, index: int) -> tuple[np.ndarray, np.ndarray]:
    """Chunk `index` of the stream of `seed`: its examples and the hashes of their blocks."""
    examples = generate_examples(np.random.default_rng([seed, index]), CHUNK_SIZE)
    return examples, examples[:, :BLOCKS_LENGTH].astype(np.uint64) @ _HASH_WEIGHTS


def distinct_examples(seed: int, count: int, workers: int = 1) -> np.ndarray:
    """The first `count` examples of the stream of `seed` whose blocks appeared in no earlier example."""
    chunks: list[tuple[np.ndarray, np.ndarray]] = []
    # Spawned, not forked, workers: the caller may hold threads (torch) that a fork would copy mid-flight.
    pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) if workers > 1 else None
    try:
        while (have := len(_first_occurrences(chunks))) < count:
            new = range(len(chunks), len(chunks) + -(-(count - have) // CHUNK_SIZE))
            chunks += pool.map(_chunk, [seed] * len(new), new) if pool else [_chunk(seed, i) for i in new]
    finally:
        if pool:
            pool.shutdown(cancel_futures=True)
    keep = _first_occurrences(chunks)[:count]
    return np.concatenate([examples for examples, _ in chunks])[keep]


def _first_occurrences(chunks: list[tuple[np.ndarray, np.ndarray]]) -> np.ndarray:
    """Stream positions of the examples whose blocks were not seen before, in stream order."""
    if not chunks:
        return np.empty(0, dtype=np.int64)
    _, first = np.unique(np.concatenate([hashes for _, hashes in chunks]), return_index=True)
    return np.sort(first)


def dataset_dir(work_dir: Path, seed: int, train_size: int, test_size: int) -> Path:
    return Path(work_dir) / f"data-v{FORMAT_VERSION}-seed{seed}-train{train_size}-test{test_size}"


def ensure_dataset(work_dir: Path, seed: int, train_size: int, test_size: int, workers: int | None = None) -> Path:
    """The folder holding train.npy and test.npy (ASCII rows), made first if it is not there yet.

    The folder appears complete or not at all: it is written under a temporary name and renamed.
    """
    if train_size < 1 or test_size < 1:
        raise ValueError(f"train_size and test_size must be positive, got {train_size} and {test_size}")
    final = dataset_dir(work_dir, seed, train_size, test_size)
    if (final / "meta.json").exists():
        return final
    workers = workers or min(os.cpu_count() or 1, 16)
    workers = workers if train_size + test_size > 2 * CHUNK_SIZE else 1
    print(f"making the data set: {test_size:,} test + {train_size:,} train examples, seed {seed}, "
          f"{workers} worker(s)", flush=True)
    start = time.perf_counter()
    examples = distinct_examples(seed, test_size + train_size, workers)
    temporary = final.with_name(f"{final.name}.tmp-{os.getpid()}")
    temporary.mkdir(parents=True, exist_ok=True)
    np.save(temporary / "test.npy", examples[:test_size])
    np.save(temporary / "train.npy", examples[test_size:])
    meta = dict(seed=seed, train_size=train_size, test_size=test_size, sequence_length=SEQUENCE_LENGTH,
                format_version=FORMAT_VERSION)
    (temporary / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        temporary.rename(final)
    except OSError:  # another process finished the same data set first: theirs is identical
        shutil.rmtree(temporary)
    print(f"data set ready in {time.perf_counter() - start:.1f} s: {final}", flush=True)
    return final


def load_split(data_dir: Path, split: str) -> np.ndarray:
    """The (n, 319) uint8 ASCII rows of "train" or "test", memory-mapped (processes share the pages)."""
    path = Path(data_dir) / f"{split}.npy"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: make the data set with ensure_dataset (run_all does)")
    return np.load(path, mmap_mode="r")


class TrainOrder:
    """Which train examples make batch number `step`: a fresh seeded permutation every epoch.

    A function of the step alone, so a resumed run reads exactly what an uninterrupted one would.
    """

    def __init__(self, train_size: int, batch_size: int, seed: int):
        if batch_size > train_size:
            raise ValueError(f"batch_size {batch_size} is larger than the train set ({train_size} examples)")
        self.train_size, self.batch_size, self.seed = train_size, batch_size, seed
        self.steps_per_epoch = train_size // batch_size
        self._epoch, self._permutation = -1, None

    def indices(self, step: int) -> np.ndarray:
        epoch, position = divmod(step, self.steps_per_epoch)
        if epoch != self._epoch:
            self._epoch = epoch
            self._permutation = np.random.default_rng([self.seed, epoch]).permutation(self.train_size)
        return self._permutation[position * self.batch_size : (position + 1) * self.batch_size]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.toy_find_block.dataset",
                                     description="Make the toy task's data set (if it is not there yet).")
    parser.add_argument("--work-dir", type=Path, required=True, help="the data set goes in a folder inside")
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--train-size", type=int, required=True)
    parser.add_argument("--test-size", type=int, required=True)
    parser.add_argument("--workers", type=int, help="processes (default: one per CPU core, at most 16)")
    args = parser.parse_args(argv)
    try:
        ensure_dataset(args.work_dir, args.seed, args.train_size, args.test_size, args.workers)
    except ValueError as error:
        parser.error(str(error))
    return 0


if __name__ == "__main__":
    sys.exit(main())
