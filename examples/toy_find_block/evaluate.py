"""The answer loss and the exact-match error of the toy task.

The model reads BOS, the 314 prompt characters and the 5 answer characters (320 tokens); the
positions from the last query letter on predict the answer and then EOS. Loss and scoring use only
those `TARGET_LENGTH` = 6 positions, as the official toy task does (loss on the target and its EOS).

Scoring is teacher-forced argmax over the answer positions, the official metric ("err_seq"):
an example is right when every position's argmax is its target token. With a fixed-length answer
this is the same verdict greedy decoding gives: greedy decoding reproduces the answer exactly
when, and only when, each argmax given the correct prefix is the correct token. It needs one
forward pass and no `generate` (and so no KV cache).
"""

import torch
import torch.nn.functional as F

from .task import BLOCK_LENGTH

TARGET_LENGTH = BLOCK_LENGTH + 1  # the answer block and EOS


def answer_logits(model: torch.nn.Module, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits (B, 6, V) at the positions that predict the answer and EOS, and those targets (B, 6).

    `tokens` is (B, 321): BOS, the 319 characters, EOS.
    """
    logits = model(input_ids=tokens[:, :-1], logits_to_keep=TARGET_LENGTH, use_cache=False).logits
    return logits.float(), tokens[:, -TARGET_LENGTH:]


def answer_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over the answer and EOS positions of the batch."""
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1))


@torch.no_grad()
def exact_match_errors(model: torch.nn.Module, tokens: torch.Tensor, batch_size: int, autocast) -> dict:
    """Counts over the test set: examples with any wrong answer token, wrong tokens, and the mean loss.

    `tokens` (n, 321) on the model's device; `autocast` a context manager factory (bf16 on CUDA).
    The model is put in eval mode (no dropout) and back in the mode it was in.
    """
    was_training = model.training
    model.eval()
    wrong_examples = wrong_tokens = 0
    loss_sum = 0.0
    for start in range(0, tokens.shape[0], batch_size):
        with autocast():
            logits, targets = answer_logits(model, tokens[start : start + batch_size])
        wrong = logits.argmax(dim=-1) != targets
        wrong_examples += int(wrong.any(dim=-1).sum())
        wrong_tokens += int(wrong.sum())
        loss_sum += float(answer_loss(logits, targets)) * targets.shape[0]
    model.train(was_training)
    n = tokens.shape[0]
    return dict(examples=n, wrong=wrong_examples, error=wrong_examples / n,
                token_error=wrong_tokens / (n * TARGET_LENGTH), loss=loss_sum / n)
