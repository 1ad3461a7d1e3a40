"""Small Trainer runs on tiny models: data a model can learn in a few steps, and the Trainer to run them."""

import torch
from transformers import Trainer, TrainingArguments, default_data_collator

from mta.finetune import CHECKPOINTING_FIELD

from .tiny import TINY

# Every MTA module type, so that each kind of MTA parameter is trained and checked.
ALL_MTA_OPS = dict(kq_conv_size=[3, 5], kq_conv_post_size=[2, 3], head_mix_size=2, head_mix_post_size=4,
                   group_norm=True, attn_gate="scalar")


def periodic_blocks(count: int = 16, length: int = 24, period: int = 4) -> torch.Tensor:
    """Blocks that repeat a random motif: learnable in a few steps by looking `period` tokens back."""
    motifs = torch.randint(0, TINY["vocab_size"], (count, period), generator=torch.Generator().manual_seed(0))
    return motifs.repeat(1, length // period)


def as_dataset(ids: torch.Tensor) -> list[dict]:
    return [{"input_ids": row.tolist(), "labels": row.tolist()} for row in ids]


def fixed_set_loss(model: torch.nn.Module, ids: torch.Tensor) -> float:
    was_training = model.training
    model.eval()
    with torch.no_grad():
        loss = model(input_ids=ids, labels=ids).loss.item()
    model.train(was_training)
    return loss


def tiny_trainer(model, ids: torch.Tensor, output_dir, lr: float, steps: int = 8, checkpointing: bool = False,
                 callbacks=None) -> Trainer:
    args = TrainingArguments(
        output_dir=str(output_dir), max_steps=steps, per_device_train_batch_size=4, learning_rate=lr,
        lr_scheduler_type="constant", save_strategy="no", report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        logging_steps=1, **{CHECKPOINTING_FIELD: checkpointing},
    )
    return Trainer(model=model, args=args, train_dataset=as_dataset(ids), data_collator=default_data_collator,
                   callbacks=callbacks)
