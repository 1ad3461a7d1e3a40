"""The training settings shared by one run (`train`) and the launcher of all runs (`run_all`).

One dataclass is the single list of options: it makes the command-line flags of both scripts and
the argument list the launcher hands to each run. The defaults are the official toy config.
"""

import argparse
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

from .models import SIZES


def _option(default, help: str, **argparse_kwargs):
    return field(default=default, metadata=dict(help=help, **argparse_kwargs))


@dataclass
class Settings:
    steps: int = _option(100_000, "total optimizer steps of a run (official: 100,000)")
    max_minutes: float | None = _option(
        None, "wall-clock budget of this session's training loop per run; the run then evaluates, "
        "checkpoints and stops (resume it later with --resume)", type=float)
    batch_size: int = _option(64, "examples per step (official: 64)")
    lr: float = _option(1e-4, "AdamW learning rate, constant (official: 1e-4)")
    warmup_steps: int = _option(
        0, "linear warm-up steps; the official config lists 1000, but its 'constant' scheduler ignores them")
    dropout: float = _option(0.1, "dropout on the attention probabilities (official: 0.1)")
    size: str = _option("paper", "model size: 'paper' (4 layers, dim 256, 2 heads) or 'tiny' (CPU tests)",
                        choices=sorted(SIZES))
    train_size: int = _option(1_000_000, "train examples (official: 1,000,000)")
    test_size: int = _option(1000, "test examples (official: 1000)")
    data_seed: int = _option(0, "seed of the data set (one data set serves every model and seed)")
    eval_every: int = _option(500, "evaluate on the test set and checkpoint every this many steps")
    eval_batch_size: int = _option(250, "batch size of evaluation")
    log_every: int = _option(100, "print the training loss every this many steps")
    compile: bool = _option(
        False, "run the model through torch.compile: on a GPU the tiny models' steps are bound by Python's overhead "
        "per operation; costs a compile for training and one for evaluation at the start")
    resume: bool = _option(False, "continue each run from its checkpoint in --work-dir, where there is one")
    work_dir: Path = _option(Path("runs/toy_find_block"), "data cache, checkpoints and logs", type=Path)
    out: Path | None = _option(
        None, "where the result files go (default: $OUT/toy if OUT is set, else WORK_DIR/results)", type=Path)

    def __post_init__(self):
        positive = ("steps", "batch_size", "train_size", "test_size", "eval_every", "eval_batch_size", "log_every")
        for name in positive:
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be at least 1, got {getattr(self, name)}")
        if self.max_minutes is not None and self.max_minutes <= 0:
            raise ValueError(f"--max-minutes must be positive, got {self.max_minutes}")
        if self.warmup_steps < 0 or not 0 <= self.dropout < 1 or self.lr <= 0:
            raise ValueError("need --warmup-steps >= 0, 0 <= --dropout < 1 and --lr > 0")
        if self.out is None:
            self.out = Path(os.environ["OUT"]) / "toy" if os.environ.get("OUT") else self.work_dir / "results"

    def to_dict(self) -> dict:
        return {k: str(v) if isinstance(v, Path) else v for k, v in asdict(self).items()}


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for f in fields(Settings):
        extra = {k: v for k, v in f.metadata.items() if k != "help"}
        if f.type is bool:
            parser.add_argument(_flag(f.name), action="store_true", help=f.metadata["help"])
        else:
            extra.setdefault("type", type(f.default))
            parser.add_argument(_flag(f.name), default=f.default, help=f.metadata["help"] + " (default: %(default)s)",
                                **extra)


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> tuple[argparse.Namespace, Settings]:
    """Parse `argv` with a parser that `add_arguments` filled; a bad setting exits like any argparse error."""
    args = parser.parse_args(argv)
    try:
        return args, Settings(**{f.name: getattr(args, f.name) for f in fields(Settings)})
    except ValueError as error:
        parser.error(str(error))


def to_argv(settings: Settings) -> list[str]:
    """Command-line arguments that `parse` turns back into `settings`."""
    argv = []
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.type is bool:
            argv += [_flag(f.name)] if value else []
        elif value is not None:
            argv += [_flag(f.name), str(value)]
    return argv
