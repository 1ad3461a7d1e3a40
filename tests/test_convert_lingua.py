"""`convert_lingua` / `mta convert-lingua`: checkpoints of the official MTA code compute the same thing here."""

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from conversion import ConversionError, convert_lingua
from conversion.lingua_config import ffn_hidden_dim
from modeling_mta import MTAForCausalLM
from mta.cli import main

from .lingua_reference import lingua_logits

# The official argument dataclasses' defaults (LMTransformerArgs, MTATransformerArgs), as params.json holds them.
MODEL_ARGS = dict(dim=32, n_layers=3, head_dim=None, n_heads=4, n_kv_heads=2, ffn_dim_multiplier=1.3, multiple_of=16,
                  norm_eps=1e-5, rope_theta=5000.0, init_base_std=None, init_std_factor="disabled", max_seqlen=64,
                  cache_attention_maps=False, dropout=0.0, triton=False, seed=42, vocab_size=61, weight_tying=False,
                  sliding_window=None)  # fmt: skip
MTA_ARGS = dict(use_mta=False, query_kernel_size=1, key_kernel_size=1, pad_key="both", mta_layers=None,
                after_sm_query_kernel_size=None, after_sm_key_kernel_size=None, init_method="identity",
                head_kernel_size=None, group_norm=False, layer_norm_rescale=False, curse_norm=False,
                pre_sm_linear_head=False, post_sm_linear_head=False, add_gating=False, gate_1d=True)  # fmt: skip

# Every MTA option on, in two configs (head_kernel_size and post_sm_linear_head exclude each other).
CASES = {
    "head-kernel-gqa-untied": dict(
        args=dict(),
        mta=dict(use_mta=True, query_kernel_size=3, key_kernel_size=5, mta_layers="0,2", after_sm_query_kernel_size=2,
                 after_sm_key_kernel_size=3, head_kernel_size=2, pre_sm_linear_head=True, group_norm=True,
                 layer_norm_rescale=True, add_gating=True, gate_1d=True),
        ffn_hidden=112,  # lingua's rule: int(2 * 4 * 32 / 3) = 85, int(1.3 * 85) = 110, up to a multiple of 16
        wrapped=True,
    ),
    "linear-heads-mha-tied": dict(
        args=dict(n_kv_heads=None, head_dim=8, ffn_dim_multiplier=None, weight_tying=True),
        mta=dict(use_mta=True, query_kernel_size=2, key_kernel_size=4, pad_key="left", mta_layers=None,
                 after_sm_query_kernel_size=3, after_sm_key_kernel_size=2, pre_sm_linear_head=True,
                 post_sm_linear_head=True, group_norm=True, add_gating=True, gate_1d=False),
        ffn_hidden=96,  # 85 up to a multiple of 16
        wrapped=False,
    ),
}  # fmt: skip
MTA_TENSORS = ("mta_kernel", "wpsm", "head_kernel", "wposm", "subln", "gate")


def model_args(case: dict) -> dict:
    return {**MODEL_ARGS, **case["args"], "mta": {**MTA_ARGS, **case["mta"]}}


def official_state_dict(args: dict, ffn_hidden: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights with the official names and shapes, in the layers where the official model has them."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=0.2, around=0.0):
        return around + scale * torch.randn(shape, generator=generator)

    dim, heads, mta = args["dim"], args["n_heads"], args["mta"]
    head_dim, kv_heads = args["head_dim"] or dim // heads, args["n_kv_heads"] or heads
    kernel_layers = range(args["n_layers"]) if mta["mta_layers"] is None else [int(i) for i in mta["mta_layers"].split(",")]
    state = {"tok_embeddings.weight": rand(args["vocab_size"], dim, scale=1.0)}
    for layer in range(args["n_layers"]):
        p = f"layers.{layer}."
        state |= {p + "attention.wq.weight": rand(heads * head_dim, dim), p + "attention.wk.weight": rand(kv_heads * head_dim, dim),
                  p + "attention.wv.weight": rand(kv_heads * head_dim, dim), p + "attention.wo.weight": rand(dim, heads * head_dim),
                  p + "feed_forward.w1.weight": rand(ffn_hidden, dim), p + "feed_forward.w3.weight": rand(ffn_hidden, dim),
                  p + "feed_forward.w2.weight": rand(dim, ffn_hidden), p + "attention_norm.weight": rand(dim, around=1.0),
                  p + "ffn_norm.weight": rand(dim, around=1.0)}  # fmt: skip
        for kernel, sizes in (("mta_kernel", ("query_kernel_size", "key_kernel_size")),
                              ("mta_kernel_after_sm", ("after_sm_query_kernel_size", "after_sm_key_kernel_size"))):
            if layer in kernel_layers and None not in (mta[sizes[0]], mta[sizes[1]]):
                state[p + "attention." + kernel] = rand(heads, 1, mta[sizes[0]], mta[sizes[1]], scale=0.5)
        if mta["pre_sm_linear_head"]:
            state[p + "attention.wpsm.weight"] = rand(heads, heads, scale=0.5) + torch.eye(heads)
        if mta["head_kernel_size"]:
            size = mta["head_kernel_size"]
            state[p + "attention.head_kernel"] = rand(heads // size, size, size, scale=0.5) + torch.eye(size)
        if mta["post_sm_linear_head"]:
            state[p + "attention.wposm.weight"] = rand(heads, heads, scale=0.5) + torch.eye(heads)
        state[p + "attention.subln.weight"] = rand(head_dim, around=1.0)
        gates = 1 if mta["gate_1d"] else head_dim
        state[p + "attention.gate.weight"], state[p + "attention.gate.bias"] = rand(gates, head_dim), rand(gates)
    state["norm.weight"] = rand(dim, around=1.0)
    if args["weight_tying"]:
        state["output.tied_module.weight"] = state["tok_embeddings.weight"]
    else:
        state["output.weight"] = rand(args["vocab_size"], dim)
    return state


def write_checkpoint(folder: Path, args: dict, state: dict, wrapped: bool) -> None:
    """A consolidated lingua folder: params.json (the training config) and consolidated.pth."""
    folder.mkdir()
    params = {"name": "test", "steps": 10, "model": args} if wrapped else args
    (folder / "params.json").write_text(json.dumps(params))
    optim = {"state": {0: {"step": torch.tensor(10.0), "exp_avg": torch.zeros(3)}}, "param_groups": [{"lr": 1e-3, "params": [0]}]}
    torch.save({"model": state, "optim": optim} if wrapped else state, folder / "consolidated.pth")


@pytest.mark.parametrize("name", CASES)
def test_converted_checkpoint_computes_what_the_official_model_computes(tmp_path, name, capsys):
    case = CASES[name]
    args = model_args(case)
    state = official_state_dict(args, case["ffn_hidden"])
    src, dst = tmp_path / "lingua", tmp_path / "mta"
    write_checkpoint(src, args, state, case["wrapped"])

    assert main(["convert-lingua", str(src), str(dst)]) == 0
    assert "model.safetensors" in capsys.readouterr().out
    model, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert type(model) is MTAForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    config = model.config
    assert config.intermediate_size == case["ffn_hidden"] and config.tie_word_embeddings == args["weight_tying"]
    assert config.group_norm and config.attn_gate is not None and config.kq_conv_post_size is not None

    tokens = torch.randint(0, args["vocab_size"], (2, 20))
    expected = lingua_logits(args, state, tokens)
    without_mta = {k: v for k, v in state.items() if not any(f".{t}" in k for t in MTA_TENSORS)}
    assert (lingua_logits(args, without_mta, tokens) - expected).abs().max() > 0.1  # the MTA weights matter
    with torch.no_grad():
        assert (model.eval()(tokens).logits - expected).abs().max() <= 1e-4


def test_ffn_width_follows_lingua():
    assert ffn_hidden_dim(4096, 256, None) == 11008  # Llama-2-7B's width comes from the same rule
    assert ffn_hidden_dim(2048, 256, 1.0) == 5632  # the paper's 1B model (configs/1B_mta.yaml)


BASE = "head-kernel-gqa-untied"


def _set(**changes):
    def change(args, state):
        for key, value in changes.items():
            target = args["mta"] if key.startswith("mta.") else args
            target[key.removeprefix("mta.")] = value
    return change


def _drop(name):
    return lambda args, state: state.pop(name)


BAD_CHECKPOINTS = {
    "no-params": (None, lambda src: (src / "params.json").unlink(), "has no params.json"),
    "no-model-args": (None, lambda src: (src / "params.json").write_text('{"name": "x"}'), "holds no model arguments"),
    "unknown-argument": (_set(n_experts=8), None, r"does not know: \['n_experts'\]"),
    "curse-norm": (_set(**{"mta.curse_norm": True}), None, "curse_norm=True: curse_norm .* has no counterpart"),
    "triton": (_set(triton=True), None, "Triton MTA implementation"),
    "sliding-window": (_set(sliding_window=16), None, "sliding-window attention has no counterpart"),
    "double-softmax": (_set(**{"mta.head_kernel_size": None, "mta.after_sm_query_kernel_size": None}), None,
                       r"in layers \[0, 1, 2\] the official code applies the softmax twice"),
    "head-kernel-not-dividing": (_set(**{"mta.head_kernel_size": 3}), None, "head_mix_post_size=3 does not divide"),
    "no-checkpoint": (None, lambda src: (src / "consolidated.pth").unlink(), "has no consolidated.pth"),
    "pickled-object": (None, lambda src: torch.save({"model": {"x": Path("x")}}, src / "consolidated.pth"),
                       "holds more than tensors"),
    "missing-tensor": (_drop("layers.1.attention.subln.weight"), None,
                       r"missing tensors .*\['model.layers.1.self_attn.group_norm.weight'\]"),
    "unexpected-tensor": (lambda args, state: state.update({"layers.0.attention.extra": torch.zeros(1)}), None,
                          r"unexpected tensors \['layers.0.attention.extra'\]"),
    "wrong-shape": (lambda args, state: state.update({"layers.0.attention.wq.weight": torch.zeros(36, 32)}), None,
                    r"layers.0.attention.wq.weight is \[36, 32\], params.json gives \[32, 32\]"),
}  # fmt: skip


@pytest.mark.parametrize("case", BAD_CHECKPOINTS)
def test_bad_checkpoint_is_refused_with_nothing_written(tmp_path, case):
    before_writing, after_writing, message = BAD_CHECKPOINTS[case]
    args = model_args(CASES[BASE])
    state = official_state_dict(args, CASES[BASE]["ffn_hidden"])
    if before_writing:
        before_writing(args, state)
    src = tmp_path / "lingua"
    write_checkpoint(src, args, state, wrapped=True)
    if after_writing:
        after_writing(src)
    with pytest.raises(ConversionError, match=message):
        convert_lingua(src, tmp_path / "out" / "mta")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["lingua"]


def test_cli_refuses_a_non_empty_destination(tmp_path, capsys):
    args = model_args(CASES[BASE])
    write_checkpoint(tmp_path / "lingua", args, official_state_dict(args, CASES[BASE]["ffn_hidden"]), wrapped=True)
    (tmp_path / "mta").mkdir()
    (tmp_path / "mta" / "keep.txt").write_text("mine")
    assert main(["convert-lingua", str(tmp_path / "lingua"), str(tmp_path / "mta")]) == 2
    assert "not empty" in capsys.readouterr().out and (tmp_path / "mta" / "keep.txt").read_text() == "mine"
    assert main(["convert-lingua", str(tmp_path / "lingua"), str(tmp_path / "mta"), "--overwrite"]) == 0
    assert not (tmp_path / "mta" / "keep.txt").exists()
