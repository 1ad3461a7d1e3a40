"""Build a tiny Llama, retrofit it into MTA, check nothing changed, train a few steps, generate.

Everything is made locally (no downloads): the "tokenizer" is the bytes of the text.
"""

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from conversion import retrofit_llama

TEXT = (
    "Multi-Token Attention lets the attention weights depend on several queries and keys at once. "
    "A small convolution over the score map mixes neighbouring queries and keys, and head mixing "
    "shares information between the heads of a group. A retrofitted Llama starts out computing "
    "exactly what it computed before, then learns to use these new parameters by fine-tuning. "
)


def tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=176,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
    )
    return LlamaForCausalLM(config).eval()


def encode(text: str) -> torch.Tensor:
    return torch.tensor([list(text.encode())])


def decode(ids: torch.Tensor) -> str:
    return bytes(ids.tolist()).decode(errors="replace")


def run(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    llama = tiny_llama(args.seed)
    model = retrofit_llama(llama)
    config = model.config
    print(
        f"tiny Llama: {sum(p.numel() for p in llama.parameters()):,} parameters, {config.num_hidden_layers} layers; "
        f"MTA: kq conv {config.kq_conv_size} in layers {config.mta_layers}, "
        f"post-softmax head mix {config.head_mix_post_size}"
    )

    ids = encode(TEXT)
    with torch.no_grad():
        diff = (llama(ids).logits - model(ids).logits).abs().max().item()
    print(f"retrofit check: max |logit diff| vs the Llama = {diff:.2e}")
    if diff > 1e-5:
        print("FAILED: the retrofitted model does not reproduce the Llama")
        return 1

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.lr)
    for step in range(1, args.steps + 1):
        loss = model(ids, labels=ids).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        if step == 1 or step % 10 == 0 or step == args.steps:
            print(f"step {step:3d}  loss {loss.item():.3f}")
    model.eval()

    kernel = model.model.layers[config.mta_layers[0]].self_attn.kq_conv
    moved = (kernel.weight - kernel.identity()).abs().max().item()
    print(f"layer {config.mta_layers[0]} kq kernel moved from identity by up to {moved:.3f}")

    prompt = "Multi-Token Attention"
    out = model.generate(encode(prompt), max_new_tokens=args.new_tokens, do_sample=False)
    print(f"greedy generation: {decode(out[0])!r}")
    if args.save:
        model.save_pretrained(args.save)
        print(f"saved to {args.save} (loads with AutoModelForCausalLM, trust_remote_code=True without this package)")
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--steps", type=int, default=150, help="training steps (default 150)")
    parser.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate (default 3e-3)")
    parser.add_argument("--new-tokens", type=int, default=40, help="tokens to generate (default 40)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", metavar="DIR", help="save the trained model here")
    parser.set_defaults(run=run)
