"""Train one model (baseline or MTA) with one seed on the toy task, evaluating as it goes.

    python -m examples.toy_find_block.train --model mta --seed 42 [--max-minutes 7] [--resume]

Every `--eval-every` steps and at the end the run evaluates on the test set, writes its numbers to
OUT/<model>-seed<seed>.json and its checkpoint to WORK_DIR/checkpoints/ (each file replaced
atomically), so a run that is killed still leaves its latest numbers, and `--resume` continues it
exactly where the checkpoint left off: the data order is a function of the step, and the random
generators are saved with the weights.
"""

import argparse
import contextlib
import os
import signal
import sys
import time

import numpy as np
import torch
import transformers

from . import settings as settings_module
from .dataset import TrainOrder, ensure_dataset, load_split
from .evaluate import answer_logits, answer_loss, exact_match_errors
from .files import replace_atomically, write_json
from .models import MODELS, build_model
from .settings import Settings
from .tokenizer import encode_rows

# Settings a resumed run must share with its checkpoint (the others may change between sessions).
SETTINGS_FIXED_BY_CHECKPOINT = ("batch_size", "lr", "warmup_steps", "dropout", "size", "train_size", "test_size",
                                "data_seed")


def run_name(model: str, seed: int) -> str:
    return f"{model}-seed{seed}"


class Run:
    """One training run: model, optimizer, data order, and the files it keeps up to date."""

    def __init__(self, model_kind: str, seed: int, settings: Settings, device: torch.device):
        self.kind, self.seed, self.settings, self.device = model_kind, seed, settings, device
        self.name = run_name(model_kind, seed)
        self.progress_path = settings.out / f"{self.name}.json"
        self.checkpoint_path = settings.work_dir / "checkpoints" / f"{self.name}.pt"

        data_dir = ensure_dataset(settings.work_dir, settings.data_seed, settings.train_size, settings.test_size)
        self.train_rows = load_split(data_dir, "train")
        self.test_tokens = torch.from_numpy(encode_rows(np.asarray(load_split(data_dir, "test")))).to(device)
        self.order = TrainOrder(len(self.train_rows), settings.batch_size, seed)

        self.model = build_model(model_kind, seed, settings.size, settings.dropout).to(device).train()
        # What the steps and evaluations call; the checkpoints keep `model`'s own parameter names.
        self.net = torch.compile(self.model, dynamic=False) if settings.compile else self.model
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=settings.lr, betas=(0.9, 0.98), eps=1e-8, weight_decay=0.0,
            fused=device.type == "cuda",
        )
        self.autocast = (
            (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if device.type == "cuda" else contextlib.nullcontext
        )
        self.step = 0
        self.train_seconds = 0.0  # summed over sessions
        self.evals: list[dict] = []
        self.recent_loss: float | None = None
        self.stop_requested = False
        self.session_start_time: float | None = None  # this session's training speed, for the progress file
        self.session_start_step = 0

    # -- checkpoints -------------------------------------------------------------------------
    def save_checkpoint(self) -> None:
        state = dict(
            model=self.model.state_dict(),
            optimizer=self.optimizer.state_dict(),
            step=self.step,
            train_seconds=self.train_seconds,
            evals=self.evals,
            settings=self.settings.to_dict(),
            cpu_rng=torch.get_rng_state(),
            cuda_rng=torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None,
        )
        replace_atomically(self.checkpoint_path, lambda p: torch.save(state, p))

    def load_checkpoint(self) -> None:
        # On the CPU: random generator states must be CPU tensors; the weights and the optimizer
        # state move to the parameters' device as they load.
        state = torch.load(self.checkpoint_path, map_location="cpu", weights_only=False)
        changed = [k for k in SETTINGS_FIXED_BY_CHECKPOINT if state["settings"][k] != getattr(self.settings, k)]
        if changed:
            raise ValueError(
                f"{self.checkpoint_path} was trained with other settings: "
                + ", ".join(f"{k}={state['settings'][k]!r} (now {getattr(self.settings, k)!r})" for k in changed)
            )
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.train_seconds, self.evals = state["step"], state["train_seconds"], state["evals"]
        torch.set_rng_state(state["cpu_rng"])
        if state["cuda_rng"] is not None and self.device.type == "cuda":
            torch.cuda.set_rng_state(state["cuda_rng"], self.device)

    # -- progress ----------------------------------------------------------------------------
    def write_progress(self, status: str, error: str | None = None):
        session_seconds = time.monotonic() - self.session_start_time if self.session_start_time else 0.0
        session_steps = self.step - self.session_start_step
        write_json(self.progress_path, dict(
            model=self.kind,
            seed=self.seed,
            status=status,
            step=self.step,
            max_steps=self.settings.steps,
            train_seconds=round(self.train_seconds, 1),
            session_steps_per_second=round(session_steps / session_seconds, 2) if session_seconds > 0 else None,
            recent_train_loss=self.recent_loss,
            final=self.evals[-1] if self.evals and self.evals[-1]["step"] == self.step else None,
            evals=self.evals,
            error_message=error,
            device=torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            versions=dict(torch=torch.__version__, transformers=transformers.__version__),
            settings=self.settings.to_dict(),
        ))

    def evaluate(self) -> dict:
        result = exact_match_errors(self.net, self.test_tokens, self.settings.eval_batch_size, self.autocast)
        result = dict(step=self.step, train_seconds=round(self.train_seconds, 1), **result)
        self.evals.append(result)
        print(f"[{self.name}] step {self.step}: test error {result['error']:.2%} "
              f"({result['wrong']}/{result['examples']}), token error {result['token_error']:.2%}, "
              f"loss {result['loss']:.4f}", flush=True)
        return result

    # -- training ----------------------------------------------------------------------------
    def batch(self, step: int) -> torch.Tensor:
        rows = self.train_rows[np.sort(self.order.indices(step))]  # sorted: the memory map reads in order
        tokens = torch.from_numpy(encode_rows(rows))
        if self.device.type == "cuda":
            tokens = tokens.pin_memory()
        return tokens.to(self.device, non_blocking=True)

    def learning_rate(self, step: int) -> float:
        warmup = self.settings.warmup_steps
        return self.settings.lr * min(1.0, (step + 1) / warmup) if warmup else self.settings.lr

    def train(self) -> str:
        """Train until the step cap, the time budget or a stop request; returns why it stopped."""
        settings = self.settings
        deadline = time.monotonic() + settings.max_minutes * 60 if settings.max_minutes else float("inf")
        self.session_start_time, self.session_start_step = time.monotonic(), self.step
        last_log, loss_sum, loss_count = self.session_start_time, torch.zeros((), device=self.device), 0
        status = "finished"
        while self.step < settings.steps:
            if time.monotonic() >= deadline:
                status = "time-limit"
                break
            if self.stop_requested:
                status = "interrupted"
                break
            for group in self.optimizer.param_groups:
                group["lr"] = self.learning_rate(self.step)
            with self.autocast():
                loss = answer_loss(*answer_logits(self.net, self.batch(self.step)))
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm=1.0, foreach=True)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.step += 1
            loss_sum += loss.detach()
            loss_count += 1

            if self.step % settings.log_every == 0 or self.step % settings.eval_every == 0:
                now = time.monotonic()
                self.train_seconds += now - last_log
                last_log = now
                if self.step % settings.log_every == 0:
                    self.recent_loss = round(float(loss_sum) / loss_count, 5)
                    loss_sum.zero_()
                    loss_count = 0
                    session_steps = self.step - self.session_start_step
                    print(f"[{self.name}] step {self.step}/{settings.steps}  loss {self.recent_loss:.4f}  "
                          f"{session_steps / (now - self.session_start_time):.1f} steps/s", flush=True)
                if self.step % settings.eval_every == 0:
                    self.evaluate()
                    self.save_checkpoint()
                    self.write_progress("running")
                    last_log = time.monotonic()  # evaluation and saving are not training time
        self.train_seconds += time.monotonic() - last_log
        return status

    def finish(self, status: str) -> dict:
        if not self.evals or self.evals[-1]["step"] != self.step:
            self.evaluate()
            self.save_checkpoint()
        self.write_progress(status)
        return self.evals[-1]


def configure_torch(device: torch.device) -> None:
    """Deterministic kernels where they exist (warn, not fail, where they do not); TF32 for fp32 matmuls."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # must precede the first cuBLAS call
    torch.use_deterministic_algorithms(True, warn_only=True)
    torch.utils.deterministic.fill_uninitialized_memory = False  # NaN-filling every empty() costs bandwidth
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def train_one(model_kind: str, seed: int, settings: Settings, device: str | None = None) -> dict:
    """Train (or resume) one run and return its final evaluation."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    configure_torch(device)
    run = Run(model_kind, seed, settings, device)
    if run.checkpoint_path.exists():
        if not settings.resume:
            raise FileExistsError(
                f"{run.checkpoint_path} exists: pass --resume to continue that run, or delete it to start over"
            )
        run.load_checkpoint()
        print(f"[{run.name}] resumed at step {run.step} ({run.train_seconds:.0f} s trained)", flush=True)
    elif settings.resume:
        print(f"[{run.name}] no checkpoint at {run.checkpoint_path}: starting from step 0", flush=True)

    previous_handler = signal.signal(signal.SIGTERM, lambda *_: setattr(run, "stop_requested", True))
    params = sum(p.numel() for p in run.model.parameters())
    print(f"[{run.name}] {params:,} parameters on {device}; training to step {settings.steps}"
          + (f" or for {settings.max_minutes:g} min" if settings.max_minutes else ""), flush=True)
    run.write_progress("running")
    try:
        status = run.train()
        final = run.finish(status)
    except BaseException as error:
        run.write_progress("failed", error=f"{type(error).__name__}: {error}")
        raise
    finally:
        signal.signal(signal.SIGTERM, previous_handler)
    print(f"[{run.name}] {status} at step {run.step} after {run.train_seconds:.0f} s of training: "
          f"test error {final['error']:.2%}", flush=True)
    return final


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.toy_find_block.train", description=__doc__.split("\n")[0])
    parser.add_argument("--model", required=True, choices=MODELS)
    parser.add_argument("--seed", required=True, type=int)
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    settings_module.add_arguments(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    args, settings = settings_module.parse(build_parser(), argv)
    train_one(args.model, args.seed, settings, args.device)
    return 0


if __name__ == "__main__":
    sys.exit(main())
