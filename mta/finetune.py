"""Fine-tune an MTA model on local text with the Transformers Trainer, and write a Hub-ready folder.

The model: an MTA folder (`mta convert-llama` output, or any saved MTA model), a Llama folder
(retrofitted in memory with the MTA recipe options), or `--tiny` (the tiny random Llama of
`mta demo`, token ids = bytes). `--train mta` trains only the MTA parameters, `full` everything,
`lora` LoRA adapters on the projections plus the MTA modules in full. bf16 on a GPU that has it.
Under `accelerate launch` the same command trains on several GPUs (DDP or FSDP; see README).
"""

import argparse
import copy
import json
import sys
import tempfile
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import transformers
from torch.distributed.tensor import DTensor
from transformers import Trainer, TrainingArguments, default_data_collator, set_seed

from conversion.errors import ConversionError
from conversion.safe_output import check_output_folder

from .convert_llama import add_recipe_arguments, recipe_options
from .finetune_base import BYTES, load_base, load_tokens
from .finetune_errors import FinetuneError
from .hub_folder import push_folder, save_hub_folder
from .model_card import model_card
from .text_data import TokenizerTokens, load_blocks
from .train_modes import TRAIN_MODES, LoraOptions, model_from_state_dict, prepare_for_training, trainable_summary

DEFAULT_LR = {"mta": 1e-3, "full": 2e-5, "lora": 2e-4}
MODE_SUMMARY = {
    "mta": "only the MTA parameters trained; every other weight is the base model's",
    "full": "every parameter trained",
    "lora": "LoRA adapters on the projections and the MTA modules in full trained, then merged",
}
SAVE_DTYPES = ("float32", "bfloat16", "float16")
LOG_FILE = "training_log.json"
# transformers 5.2x renamed gradient checkpointing to activation checkpointing (the old name warns).
CHECKPOINTING_FIELD = next(name for name in ("activation_checkpointing", "gradient_checkpointing")
                           if name in TrainingArguments.__dataclass_fields__)


def use_bf16(precision: str) -> bool:
    if precision == "auto":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported()
    return precision == "bf16"


def training_arguments(args: argparse.Namespace, checkpoint_dir: Path) -> TrainingArguments:
    return TrainingArguments(
        output_dir=str(checkpoint_dir),
        max_steps=args.steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=args.grad_accum,
        learning_rate=args.lr if args.lr is not None else DEFAULT_LR[args.train],
        lr_scheduler_type=args.lr_schedule,
        warmup_steps=args.warmup_steps,
        weight_decay=args.weight_decay,
        bf16=use_bf16(args.precision),
        use_cpu=not torch.cuda.is_available(),
        seed=args.seed,
        data_seed=args.seed,
        logging_steps=args.logging_steps,
        save_strategy="steps" if args.save_steps else "no",
        save_steps=args.save_steps or 500,
        report_to=[],
        # Every step sees a full global batch, so runs on different numbers of GPUs see the same batches.
        dataloader_drop_last=True,
        remove_unused_columns=False,
        ddp_find_unused_parameters=False,
        **{CHECKPOINTING_FIELD: args.gradient_checkpointing},
    )


def peak_gpu_memory_gib() -> float | None:
    """This process's peak GPU memory so far (None without CUDA)."""
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else None


def training_summary(args: argparse.Namespace, trainer: Trainer, losses: list[dict], seconds: float,
                     tokens_name: str) -> list[str]:
    """Markdown lines for the model card: how the model was trained."""
    targs = trainer.args
    processes = f"{targs.world_size} {'process' if targs.world_size == 1 else 'processes'}"
    global_batch = targs.per_device_train_batch_size * targs.gradient_accumulation_steps * targs.world_size
    schedule = getattr(targs.lr_scheduler_type, "value", targs.lr_scheduler_type)
    precision = "bf16 mixed precision" if targs.bf16 else "float32"
    lines = [
        f"- `--train {args.train}`: {MODE_SUMMARY[args.train]}.",
        f"- Data: {', '.join(Path(p).name for p in args.data)}; blocks of {args.block_size} tokens ({tokens_name}).",
        f"- {trainer.state.global_step} steps, global batch {global_batch} blocks ({processes}), learning rate "
        f"{targs.learning_rate} ({schedule}), weight decay {targs.weight_decay}, {precision}"
        f"{', gradient checkpointing' if args.gradient_checkpointing else ''}; {seconds:.0f} s.",
    ]
    if losses:
        lines.append(f"- Training loss: {losses[0]['loss']:.4f} at step {losses[0]['step']}, "
                     f"{losses[-1]['loss']:.4f} at step {losses[-1]['step']}.")
    lines.append(f"- Software: torch {torch.__version__}, transformers {transformers.__version__}.")
    return lines


def run(args: argparse.Namespace) -> int:
    output = Path(args.output)
    if args.save_steps:
        checkpoints = nullcontext(args.checkpoint_dir or output.with_name(output.name + "-checkpoints"))
    else:  # the Trainer makes its output folder even when it saves nothing there
        checkpoints = tempfile.TemporaryDirectory(prefix="mta-finetune-")
    with checkpoints as checkpoint_dir:
        return finetune(args, output, Path(checkpoint_dir))


def finetune(args: argparse.Namespace, output: Path, checkpoint_dir: Path) -> int:
    start = time.perf_counter()
    set_seed(args.seed)
    try:
        check_output_folder(args.model, output, args.overwrite)
        base = load_base(args.model, args.seed if args.tiny else None, recipe_options(args))
        tokens = load_tokens(args.tokenizer, base)
        targs = training_arguments(args, checkpoint_dir)
        with targs.main_process_first(desc="preparing the data"):
            blocks = load_blocks(args.data, tokens, args.block_size, args.text_field, cache_dir=args.data_cache)
    except (FinetuneError, ConversionError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    config = copy.deepcopy(base.model.config)  # as loaded: the Trainer may change the model's own
    lora = lora_options(args)
    model = prepare_for_training(base.model, args.train, lora)
    trainer = Trainer(model=model, args=targs, train_dataset=blocks, data_collator=default_data_collator)
    if trainer.is_world_process_zero():
        print(f"base: {base.description}\n{len(blocks)} blocks of {args.block_size} tokens ({tokens.name}); "
              f"--train {args.train}: {trainable_summary(model)}", flush=True)
    trainer.train()
    seconds = time.perf_counter() - start

    # Every process takes part in gathering the weights (they may be sharded); the first one writes. The others
    # wait for it and all leave the process group together: a process that exits while the first still writes
    # makes the launcher stop the run, and one that exits with NCCL communicators alive can crash on the way out.
    state_dict = trainer.accelerator.get_state_dict(trainer.model)
    try:
        if not trainer.is_world_process_zero():
            return 0
        return write_output(args, output, start, seconds, base, tokens, targs, config, lora, trainer, state_dict)
    finally:
        trainer.accelerator.wait_for_everyone()
        trainer.accelerator.end_training()
        if trainer.accelerator.num_processes > 1:
            # Gloo's worker thread frees the barrier's tensors after the barrier returns, and takes the GIL to do
            # so; the DDP model's destructor (when this function returns) holds the GIL while it waits for that
            # thread. Seen once in CI (torch 2.13, rank 1 of 2 hung there for good). Sleeping releases the GIL.
            time.sleep(0.5)


def lora_options(args: argparse.Namespace) -> LoraOptions:
    return LoraOptions(rank=args.lora_rank, alpha=args.lora_alpha, dropout=args.lora_dropout, mlp=args.lora_mlp)


def write_output(args, output, start, seconds, base, tokens, targs, config, lora, trainer, state_dict) -> int:
    """The Hub-ready folder (and its upload where asked), written by the first process."""
    losses = [{"step": h["step"], "loss": h["loss"], "learning_rate": h.get("learning_rate")}
              for h in trainer.state.log_history if "loss" in h]
    log = dict(losses=losses, train_mode=args.train, world_size=targs.world_size, seconds=round(seconds, 1),
               distributed_type=str(trainer.accelerator.distributed_type.value),
               parameters_sharded=any(isinstance(p, DTensor) for p in trainer.model.parameters()),
               per_device_batch=targs.per_device_train_batch_size, grad_accum=targs.gradient_accumulation_steps,
               steps=trainer.state.global_step, bf16=targs.bf16, peak_gpu_memory_gib=peak_gpu_memory_gib())
    card = model_card(config, base_model=args.base_name or base.description, tokenizer=tokens.name,
                      training=training_summary(args, trainer, losses, seconds, tokens.name),
                      repo_id=args.push_to_hub, has_adapter=args.train == "lora")
    default_dtype = torch.bfloat16 if targs.bf16 else torch.float32
    try:
        save_hub_folder(model_from_state_dict(config, args.train, lora, state_dict), output, card=card,
                        dtype=getattr(torch, args.save_dtype) if args.save_dtype else default_dtype,
                        src=base.folder, overwrite=args.overwrite,
                        tokenizer=tokens.tokenizer if isinstance(tokens, TokenizerTokens) else None,
                        extra_files={LOG_FILE: json.dumps(log, indent=1) + "\n"})
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"wrote {output} (loads with AutoModelForCausalLM.from_pretrained(..., trust_remote_code=True)) "
          f"in {time.perf_counter() - start:.0f} s")
    return upload(output, args.push_to_hub, args.private) if args.push_to_hub else 0


def upload(folder: Path, repo_id: str, private: bool) -> int:
    try:
        url = push_folder(folder, repo_id, private=private)
    except Exception as error:  # whatever the Hub or the network says, the folder stays complete on disk
        print(f"error: uploading {folder} to {repo_id} failed: {error}\nThe folder is complete; upload it later "
              f"with `hf upload {repo_id} {folder}`", file=sys.stderr)
        return 1
    print(f"uploaded to {url}")
    return 0


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", metavar="DIR", help="an MTA folder (`mta convert-llama` output, a saved MTA model) "
                        "or a Llama folder, retrofitted in memory with the MTA recipe options")
    source.add_argument("--tiny", action="store_true", help="the tiny random Llama of `mta demo`, retrofitted "
                        "(token ids = UTF-8 bytes): a CPU check of the whole path")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help=".txt files (one document each) or .jsonl files (one document a line)")
    parser.add_argument("--text-field", default="text",
                        help="the field of .jsonl records holding the text (default text)")
    parser.add_argument("--output", required=True, metavar="DIR", help="the Hub-ready model folder to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace a non-empty --output (once the new one is complete)")
    parser.add_argument("--train", choices=TRAIN_MODES, default="mta",
                        help="what trains: the MTA parameters only (default), everything, or LoRA + the MTA modules")
    parser.add_argument("--tokenizer", metavar=f"DIR|{BYTES}", help="default: the model folder's tokenizer "
                        f"(none with --tiny, whose token ids are bytes); '{BYTES}': UTF-8 bytes as token ids")
    training = parser.add_argument_group("training")
    training.add_argument("--steps", type=positive_int, default=100, help="optimizer steps (default 100)")
    training.add_argument("--batch-size", type=positive_int, default=8, help="blocks per device and step (default 8)")
    training.add_argument("--grad-accum", type=positive_int, default=1, help="gradient accumulation steps (default 1)")
    training.add_argument("--block-size", type=positive_int, default=512,
                          help="tokens per training block (default 512)")
    training.add_argument("--lr", type=float, help="learning rate (default: " +
                          ", ".join(f"{v:g} for {k}" for k, v in DEFAULT_LR.items()) + ")")
    training.add_argument("--lr-schedule", default="linear", help="Transformers scheduler name (default linear)")
    training.add_argument("--warmup-steps", type=int, default=0)
    training.add_argument("--weight-decay", type=float, default=0.0)
    training.add_argument("--precision", choices=("auto", "bf16", "fp32"), default="auto",
                          help="auto: bf16 mixed precision on a GPU that has it, float32 elsewhere")
    training.add_argument("--gradient-checkpointing", action="store_true",
                          help="recompute each layer in the backward pass (less memory, more compute)")
    training.add_argument("--seed", type=int, default=0)
    training.add_argument("--logging-steps", type=positive_int, default=10,
                          help="log the loss every N steps (default 10)")
    training.add_argument("--save-steps", type=positive_int, help="also write Trainer checkpoints every N steps")
    training.add_argument("--checkpoint-dir", metavar="DIR", help="where Trainer checkpoints go "
                          "(default: OUTPUT-checkpoints)")
    training.add_argument("--data-cache", metavar="DIR",
                          help="where `datasets` keeps processed data (default: its own cache)")
    lora = parser.add_argument_group("LoRA (--train lora)")
    lora.add_argument("--lora-rank", type=positive_int, default=16)
    lora.add_argument("--lora-alpha", type=int, default=32)
    lora.add_argument("--lora-dropout", type=float, default=0.0)
    lora.add_argument("--lora-mlp", action="store_true", help="also adapt the MLP projections")
    add_recipe_arguments(parser)
    hub = parser.add_argument_group("output")
    hub.add_argument("--save-dtype", choices=SAVE_DTYPES, help="dtype of the saved weights "
                     "(default: bfloat16 after bf16 training, else float32)")
    hub.add_argument("--base-name", help="how the model card names the base model, e.g. a Hub id "
                     "(default: the --model folder)")
    hub.add_argument("--push-to-hub", metavar="REPO", help="upload the folder to this Hub model repository afterwards")
    hub.add_argument("--private", action="store_true", help="with --push-to-hub, make a new repository private")
    parser.set_defaults(run=run)
