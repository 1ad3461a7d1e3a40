"""Train every model with every seed in parallel, then print and write the results table.

    python -m examples.toy_find_block.run_all --max-minutes 7            # paper settings, 2 models x 3 seeds
    python -m examples.toy_find_block.run_all --max-minutes 7 --resume   # continue those runs later

Makes the data set once (WORK_DIR), then starts one process per (model, seed). The models are tiny,
so all of them share one GPU; with several GPUs the runs are dealt out round-robin. Each run's
output goes to WORK_DIR/logs/<model>-seed<seed>.log and its numbers to OUT/<model>-seed<seed>.json;
the table goes to OUT/results.md and OUT/results.json. SIGTERM or Ctrl-C stops the runs early:
each evaluates, checkpoints and reports what it has.
"""

import argparse
import itertools
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch

from . import settings as settings_module
from .models import MODELS
from .report import latest_eval, load_runs, write_report
from .train import run_name

REPO_ROOT = Path(__file__).resolve().parents[2]
STATUS_EVERY_SECONDS = 60
STOP_GRACE_SECONDS = 120  # time a stopped run gets to evaluate and checkpoint


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m examples.toy_find_block.run_all",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--seeds", nargs="+", type=int, default=[42, 43, 44], help="(official: 42 43 44)")
    settings_module.add_arguments(parser)
    return parser


def start_runs(runs: list[tuple[str, int]], settings, env: dict, log_dir: Path) -> dict[str, subprocess.Popen]:
    gpus = torch.cuda.device_count()
    # Indices into what this process sees, which may already be a CUDA_VISIBLE_DEVICES subset.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpu_ids = visible.split(",")[:gpus] if visible else [str(i) for i in range(gpus)]
    threads = max(1, (os.cpu_count() or 1) // len(runs))
    print(f"starting {len(runs)} runs on {f'{gpus} GPU(s)' if gpus else 'the CPU'}, {threads} CPU thread(s) each",
          flush=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    processes = {}
    for i, (model, seed) in enumerate(runs):
        name = run_name(model, seed)
        run_env = dict(env, OMP_NUM_THREADS=str(threads))
        if gpus:
            run_env["CUDA_VISIBLE_DEVICES"] = gpu_ids[i % gpus]
        command = [sys.executable, "-m", "examples.toy_find_block.train", "--model", model, "--seed", str(seed),
                   *settings_module.to_argv(settings)]
        with open(log_dir / f"{name}.log", "a") as log:  # appended: a resumed run keeps its history
            processes[name] = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=run_env)
        where = f"GPU {run_env['CUDA_VISIBLE_DEVICES']}" if gpus else "CPU"
        print(f"  {name}: {where}, log {log_dir / name}.log", flush=True)
    return processes


def print_status(out_dir: Path, names: set[str], started: float) -> None:
    parts = []
    for run in load_runs(out_dir, names):
        last = latest_eval(run)
        error = f" err {last['error']:.1%}@{last['step']}" if last else ""
        parts.append(f"{run['model']}-{run['seed']}: step {run['step']}{error}")
    print(f"[{(time.monotonic() - started) / 60:.1f} min] " + ("; ".join(parts) or "starting"), flush=True)


def wait(processes: dict[str, subprocess.Popen], out_dir: Path) -> None:
    """Wait for every run, printing progress; on SIGTERM or Ctrl-C, ask the runs to stop and wait for them."""
    started = time.monotonic()
    stopping = []

    def stop(signum, frame):
        stopping.append(time.monotonic())
        print("stopping: asking every run to evaluate, checkpoint and exit", flush=True)
        for process in processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        last_status = time.monotonic()
        while any(p.poll() is None for p in processes.values()):
            time.sleep(1)
            if stopping and time.monotonic() - stopping[0] > STOP_GRACE_SECONDS:
                for process in processes.values():
                    process.kill()
            if time.monotonic() - last_status >= STATUS_EVERY_SECONDS:
                print_status(out_dir, set(processes), started)
                last_status = time.monotonic()
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, settings = settings_module.parse(parser, argv)
    # The runs may start elsewhere than here: hand them absolute paths.
    settings.work_dir, settings.out = settings.work_dir.resolve(), settings.out.resolve()
    runs = list(itertools.product(args.models, args.seeds))
    if len(set(runs)) != len(runs):
        parser.error("--models and --seeds repeat a run")
    started = time.monotonic()
    print("settings: " + json.dumps(settings.to_dict()), flush=True)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    # In a process of its own, whose worker processes then need not import torch as this one did.
    made = subprocess.run([sys.executable, "-m", "examples.toy_find_block.dataset",
                           "--work-dir", str(settings.work_dir), "--seed", str(settings.data_seed),
                           "--train-size", str(settings.train_size), "--test-size", str(settings.test_size)], env=env)
    if made.returncode != 0:
        print(f"error: making the data set failed (exit code {made.returncode})", file=sys.stderr)
        return 1
    log_dir = settings.work_dir / "logs"
    processes = start_runs(runs, settings, env, log_dir)
    wait(processes, settings.out)

    failed = [name for name, p in processes.items() if p.returncode != 0]
    for name in failed:
        tail = (log_dir / f"{name}.log").read_text(errors="replace").splitlines()[-25:]
        print(f"\n{name} exited with code {processes[name].returncode}; end of its log:\n" + "\n".join(tail))
    print(f"\nall runs ended after {(time.monotonic() - started) / 60:.1f} min; results in {settings.out}\n",
          flush=True)
    try:
        write_report(settings.out, set(processes))
    except FileNotFoundError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
