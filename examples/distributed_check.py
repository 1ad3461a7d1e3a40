"""Check that fine-tuning on several processes follows the 1-process run with the same global batch.

    python -m examples.distributed_check --out OUT --processes 2 --global-batch 8 --steps 50 \\
        -- --model DIR --data FILE --train full [other `mta finetune` options]

Runs `mta finetune` (examples/finetune.py) with the same data order and global batch B:
  one   1 process, batch B;
  ddp   `accelerate launch` with examples/accelerate_ddp.yaml, P processes of batch B / P;
  fsdp  `accelerate launch` with examples/accelerate_fsdp.yaml, P processes of batch B / P, and a
        sharded checkpoint at the last step, which is then reloaded into one process here and
        compared with the folder the FSDP run wrote.
Accelerate runs FSDP only on GPUs (on CPUs its FSDP config falls back to DDP), so without CUDA the
fsdp run is skipped and the JSON says so. Writes OUT/distributed_check.json (every step's loss per
run, the largest differences, the final weights' differences, the reload check), a Markdown table
OUT/distributed_check.md, and the three runs' training_log.json. Exit status 1 if a loss differs
from the 1-process run's by more than --loss-tolerance (for FSDP in bf16, plus one bf16 step of the
loss: it computes in bf16 parameters, so its logits and loss are bf16 numbers).
"""

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import load_file

from modeling_mta import MTAForCausalLM
from mta.convert_llama import recipe_options
from mta.finetune import add_arguments as add_finetune_arguments
from mta.finetune import lora_options
from mta.finetune_base import load_base
from mta.fsdp_checkpoint import load_sharded_checkpoint
from mta.train_modes import prepare_for_training

REPO = Path(__file__).resolve().parents[1]
CONFIGS = {"ddp": REPO / "examples" / "accelerate_ddp.yaml", "fsdp": REPO / "examples" / "accelerate_fsdp.yaml"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_command(run: str, processes: int) -> list[str]:
    if run == "one":
        return [sys.executable, "-m", "examples.finetune"]
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS[run]),
            "--num_processes", str(processes), "--main_process_port", str(free_port()), "-m", "examples.finetune"]


def train(run: str, processes: int, batch: int, steps: int, work: Path, finetune_args: list[str],
          timeout: float | None = None) -> dict:
    """One `mta finetune` run; its training log. A run still going after `timeout` seconds is killed, with every
    process it started (a hung rank would otherwise hold the check forever)."""
    output = work / run
    command = launch_command(run, processes) + [
        *finetune_args, "--output", str(output), "--overwrite", "--steps", str(steps), "--batch-size", str(batch),
        "--logging-steps", "1", "--save-dtype", "float32", "--checkpoint-dir", str(work / f"{run}-checkpoints"),
    ]
    if run == "fsdp":
        command += ["--save-steps", str(steps)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    if run == "one" and torch.cuda.is_available():
        env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0]
    print(f"[{run}] {' '.join(command)}", flush=True)
    start = time.perf_counter()
    with open(work / f"{run}.log", "w") as log:
        launcher = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
        try:
            returncode = launcher.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(launcher.pid, signal.SIGKILL)
            launcher.wait()
            raise SystemExit(f"[{run}] still running after {timeout:.0f} s: killed; log: {work / f'{run}.log'}")
    if returncode != 0:
        print((work / f"{run}.log").read_text()[-4000:])
        raise SystemExit(f"[{run}] failed with exit status {returncode}; log: {work / f'{run}.log'}")
    print(f"[{run}] done in {time.perf_counter() - start:.0f} s", flush=True)
    return json.loads((output / "training_log.json").read_text())


# FSDP with bf16 casts the parameters, not the operations (as autocast does for the other runs): its logits
# and each process's loss are bf16 numbers, one bf16 step (2**-7 of the value) apart at most.
BF16_STEP = 2**-7


def loss_tolerance(tolerance: float, log: dict, loss: float) -> float:
    """The largest |loss difference| allowed from the 1-process run's `loss` for a run with training log `log`."""
    sharded_bf16 = log["parameters_sharded"] and log["bf16"]
    return tolerance + (BF16_STEP * abs(loss) if sharded_bf16 else 0.0)


def weight_difference(folder: Path, reference: Path) -> float:
    """Largest |difference| between the tensors of two model folders, relative to the reference's largest |value|."""
    a, b = (load_file(f / "model.safetensors") for f in (folder, reference))
    return max((a[k].float() - b[k].float()).abs().max().item() / b[k].float().abs().max().clamp(min=1e-12).item()
               for k in b)


def reload_check(work: Path, steps: int, finetune_args: list[str]) -> dict:
    """The FSDP run's sharded checkpoint, reloaded in this one process, against the folder that run wrote."""
    args = finetune_arguments(finetune_args + ["--output", str(work / "fsdp")])
    written = MTAForCausalLM.from_pretrained(work / "fsdp").eval()
    # Built as the trained model was, from the same base: a LoRA checkpoint holds the adapter alone.
    base = load_base(args.model, args.seed if args.tiny else None, recipe_options(args)).model
    skeleton = prepare_for_training(base, args.train, lora_options(args))
    reloaded = load_sharded_checkpoint(skeleton, work / "fsdp-checkpoints" / f"checkpoint-{steps}")
    if args.train == "lora":
        reloaded = reloaded.merge_and_unload()
    ids = torch.randint(0, written.config.vocab_size, (2, 64), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (reloaded.eval()(ids).logits - written(ids).logits).abs().max().item()
    return {"checkpoint": str(work / "fsdp-checkpoints" / f"checkpoint-{steps}"), "max_abs_logit_diff": diff}


def finetune_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_finetune_arguments(parser)
    return parser.parse_args(argv)


def markdown(report: dict) -> str:
    runs = [r for r in ("one", "ddp", "fsdp") if r in report["losses"]]
    lines = ["| step | " + " | ".join(runs) + " |", "|---:|" + "---:|" * len(runs)]
    for i, step in enumerate(report["steps"]):
        lines.append(f"| {step} | " + " | ".join(f"{report['losses'][r][i]:.5f}" for r in runs) + " |")
    lines.append("")
    for run, summary in report["runs"].items():
        lines.append(f"- {run}: {json.dumps(summary)}")
    if "reload" in report:
        lines.append(f"- FSDP checkpoint reloaded in one process: {json.dumps(report['reload'])}")
    for note in report["notes"]:
        lines.append(f"- {note}")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    split = argv.index("--") if "--" in argv else len(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="where the report goes")
    parser.add_argument("--processes", type=int, default=2)
    parser.add_argument("--global-batch", type=int, default=8, help="blocks per optimizer step, over all processes")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--runs", nargs="+", choices=("ddp", "fsdp"), default=["ddp", "fsdp"])
    parser.add_argument("--loss-tolerance", type=float, default=0.02,
                        help="largest allowed |loss difference| (FSDP in bf16: plus one bf16 step of the loss)")
    parser.add_argument("--work", help="where the runs write (default: a temporary folder, removed afterwards)")
    parser.add_argument("--run-timeout", type=float, help="seconds after which a run counts as hung and is killed")
    args = parser.parse_args(argv[:split])
    finetune_args = argv[split + 1 :]
    if args.global_batch % args.processes:
        parser.error(f"--global-batch {args.global_batch} must be a multiple of --processes {args.processes}")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    notes = []
    runs = list(args.runs)
    if "fsdp" in runs and not torch.cuda.is_available():
        runs.remove("fsdp")
        notes.append("fsdp not run: no CUDA here, and accelerate runs FSDP only on GPUs")

    work = Path(args.work) if args.work else Path(tempfile.mkdtemp(prefix="mta-distributed-check-"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        logs = {"one": train("one", 1, args.global_batch, args.steps, work, finetune_args, args.run_timeout)}
        for run in runs:
            logs[run] = train(run, args.processes, args.global_batch // args.processes, args.steps, work, finetune_args,
                              args.run_timeout)
        for run, log in logs.items():
            shutil.copy(work / run / "training_log.json", out / f"training_log_{run}.json")
        steps = [entry["step"] for entry in logs["one"]["losses"]]
        losses = {run: [entry["loss"] for entry in log["losses"]] for run, log in logs.items()}
        report = {"steps": steps, "losses": losses, "notes": notes, "global_batch": args.global_batch,
                  "finetune_args": finetune_args, "devices": torch.cuda.device_count(), "runs": {}}
        worst = 0.0
        for run in logs:
            summary = {k: logs[run][k]
                       for k in ("world_size", "distributed_type", "parameters_sharded", "bf16", "seconds",
                                 "peak_gpu_memory_gib")}
            if run != "one":
                diffs = [abs(a - b) for a, b in zip(losses[run], losses["one"], strict=True)]
                allowed = [loss_tolerance(args.loss_tolerance, logs[run], loss) for loss in losses["one"]]
                summary |= {"max_abs_loss_diff": max(diffs), "mean_abs_loss_diff": sum(diffs) / len(diffs),
                            "max_loss_diff_over_allowed": max(d / a for d, a in zip(diffs, allowed)),
                            "final_weights_max_rel_diff": weight_difference(work / run, work / "one")}
                worst = max(worst, summary["max_loss_diff_over_allowed"])
            report["runs"][run] = summary
        if "fsdp" in runs:
            report["reload"] = reload_check(work, args.steps, finetune_args)
        report["within_tolerance"] = worst <= 1
        (out / "distributed_check.json").write_text(json.dumps(report, indent=1) + "\n")
        (out / "distributed_check.md").write_text(markdown(report))
        print(markdown(report))
    finally:
        if not args.work:
            shutil.rmtree(work, ignore_errors=True)
    return 0 if report["within_tolerance"] else 1


if __name__ == "__main__":
    sys.exit(main())
