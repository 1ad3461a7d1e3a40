"""`convert_llama` / `mta convert-llama`: Llama folders on disk become MTA folders that compute the same thing."""

import hashlib
import json
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from tokenizers import Regex, Tokenizer, models, pre_tokenizers
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from conversion import ConversionError, convert_llama
from conversion.safe_output import PARTIAL_MARK, staged_output
from conversion.llama_verification import PROMPT
from modeling_mta import MTAForCausalLM
from modeling_mta.modeling_mta import is_mta_parameter
from mta.cli import main

from .test_save_load import logits_without_the_package
from .tiny import LLAMA3_ROPE, TINY, tiny_llama

SHARDED = "20KB"  # a few tensors per shard for the tiny models


def char_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character (unknown characters -> <unk>): a real tokenizer, built without downloads."""
    chars = " abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-"
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>")


def llama_folder(folder: Path, dtype=torch.float32, shard_size=SHARDED, tokenizer=False, **overrides) -> LlamaForCausalLM:
    llama = tiny_llama(dtype, **overrides)
    llama.save_pretrained(folder, max_shard_size=shard_size)
    if tokenizer:
        char_tokenizer().save_pretrained(folder)
    return llama


def folder_tensors(folder: Path) -> dict[str, torch.Tensor]:
    files = sorted(folder.glob("*.safetensors"))
    return {name: t for file in files for name, t in load_file(file).items()}


def file_hashes(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


@torch.no_grad()
def greedy(model, ids: torch.Tensor) -> list[int]:
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=20, do_sample=False,
                         eos_token_id=None)
    assert out.shape[1] == ids.shape[1] + 20
    return out[0].tolist()


def assert_same_model(src: Path, dst: Path, seq_len: int = 40):
    """float32 logits within 1e-5 and identical 20-token greedy continuations."""
    llama = LlamaForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    mta, info = AutoModelForCausalLM.from_pretrained(dst, dtype=torch.float32, output_loading_info=True)
    assert type(mta) is MTAForCausalLM
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    ids = torch.randint(0, TINY["vocab_size"], (2, seq_len))
    with torch.no_grad():
        assert (mta.eval()(ids).logits - llama(ids).logits).abs().max() <= 1e-5
    assert greedy(mta, ids[:1, :8]) == greedy(llama, ids[:1, :8])


@pytest.mark.parametrize(
    "dtype, shard_size, overrides",
    [
        (torch.float32, SHARDED, dict()),
        (torch.bfloat16, SHARDED, dict(num_key_value_heads=4, tie_word_embeddings=True)),
        (torch.float32, "10MB", dict(rope_parameters=LLAMA3_ROPE, attention_bias=True, mlp_bias=True, head_dim=16)),
    ],
    ids=["gqa-untied-fp32-sharded", "mha-tied-bf16-sharded", "llama3-rope-bias-headdim-single-file"],
)
def test_converted_folder_computes_what_the_llama_computed(tmp_path, dtype, shard_size, overrides):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama = llama_folder(src, dtype, shard_size, **overrides)
    conversion = convert_llama(src, dst)
    assert conversion.new_dtype == dtype and conversion.config.mta_layers == [2, 6]

    config = json.loads((dst / "config.json").read_text())
    assert config["model_type"] == "mta" and config["architectures"] == ["MTAForCausalLM"]
    assert config["auto_map"] == {"AutoConfig": "configuration_mta.MTAConfig", "AutoModel": "modeling_mta.MTAModel",
                                  "AutoModelForCausalLM": "modeling_mta.MTAForCausalLM"}
    llama_fields = json.loads((src / "config.json").read_text())
    for field in set(llama_fields) - {"model_type", "architectures", "transformers_version"}:
        assert config[field] == llama_fields[field], field
    for name in ("configuration_mta.py", "modeling_mta.py", "mta_reference.py", "generation_config.json"):
        assert (dst / name).is_file(), name

    index = json.loads((dst / "model.safetensors.index.json").read_text())
    written = folder_tensors(dst)
    assert set(index["weight_map"]) == set(written)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in written.values())
    llama_tensors = folder_tensors(src)
    for name, tensor in llama_tensors.items():  # bytes and dtype unchanged
        assert written[name].dtype == tensor.dtype and torch.equal(written[name], tensor), name
    new = {name: t for name, t in written.items() if name not in llama_tensors}
    assert new and all(is_mta_parameter(name) and t.dtype == dtype for name, t in new.items())
    assert next(p for p in llama.parameters()).dtype == dtype
    assert_same_model(src, dst)


ROPE_KINDS = {
    "linear": {"rope_type": "linear", "factor": 2.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32},
    "longrope": {"rope_type": "longrope", "short_factor": [1.0, 1.1, 1.2, 1.3], "long_factor": [1.5, 2.0, 3.0, 4.0],
                 "original_max_position_embeddings": 32},
    "llama3": {k: v for k, v in LLAMA3_ROPE.items() if k != "rope_theta"},
}


@pytest.mark.parametrize("kind", ROPE_KINDS)
def test_legacy_rope_scaling_configs_of_every_kind_carry_over(tmp_path, kind):
    """Hub Llamas carry `rope_scaling` + `rope_theta` (the pre-5.0 spelling); the MTA model must read them alike."""
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama_folder(src)
    config = json.loads((src / "config.json").read_text())
    del config["rope_parameters"]
    config.update(rope_theta=20000.0, rope_scaling=ROPE_KINDS[kind])
    (src / "config.json").write_text(json.dumps(config))

    convert_llama(src, dst)
    expected = LlamaConfig.from_pretrained(src).rope_parameters
    assert expected["rope_type"] == kind and expected["rope_theta"] == 20000.0
    assert AutoModelForCausalLM.from_pretrained(dst).config.rope_parameters == expected
    assert_same_model(src, dst, seq_len=60)  # past original_max_position_embeddings, where the kinds differ


def test_cli_copies_side_files_leaves_the_source_alone_and_verifies(tmp_path, capsys):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama_folder(src, torch.bfloat16, tokenizer=True)
    (src / "LICENSE").write_text("the Llama's license\n")
    before = file_hashes(src)
    assert main(["convert-llama", str(src), str(dst), "--verify"]) == 0
    printed = capsys.readouterr().out
    assert "new MTA tensors (bfloat16, identity)" in printed
    verdict = next(line for line in printed.splitlines() if line.startswith("verify:"))
    assert "agree" in verdict and verdict.endswith("OK")
    assert f"over {len(PROMPT)} prompt tokens" in verdict  # the tokenizer was used: one token per character
    assert file_hashes(src) == before
    after = file_hashes(dst)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json", "LICENSE"):
        assert after[name] == before[name], name


def test_converted_folder_loads_with_trust_remote_code_without_the_package(tmp_path):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama = llama_folder(src)
    convert_llama(src, dst, head_mix_size=2, kq_conv_post_size=[2, 3])
    ids = torch.randint(0, TINY["vocab_size"], (2, 12))
    with torch.no_grad():
        assert (logits_without_the_package(dst, ids, tmp_path) - llama(ids).logits).abs().max() <= 1e-5


def test_cli_recipe_options_reach_the_config_and_stay_identity(tmp_path, capsys):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama_folder(src, torch.bfloat16)
    args = ["--mta-layers", "0,3", "--kq-conv-size", "3x4", "--kq-conv-post-size", "2x3", "--key-padding", "left",
            "--head-mix-size", "2", "--head-mix-post-size", "none", "--dtype", "float32"]
    assert main(["convert-llama", str(src), str(dst), *args]) == 0
    config = AutoModelForCausalLM.from_pretrained(dst).config
    assert (config.mta_layers, config.kq_conv_size, config.kq_conv_post_size) == ([0, 3], [3, 4], [2, 3])
    assert (config.key_padding, config.head_mix_size, config.head_mix_post_size) == ("left", 2, None)
    assert (config.group_norm, config.attn_gate) == (False, None)
    new = {name: t for name, t in folder_tensors(dst).items() if is_mta_parameter(name)}
    assert sorted({name.split(".")[2] for name in new if "kq_conv" in name}) == ["0", "3"]
    assert {t.dtype for t in new.values()} == {torch.float32}
    assert_same_model(src, dst)


def test_non_identity_options_warn_and_verify_reports_the_mismatch(tmp_path, capsys):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama_folder(src)
    with pytest.warns(UserWarning, match="not identity"):
        assert main(["convert-llama", str(src), str(dst), "--group-norm", "--attn-gate", "scalar", "--verify"]) == 1
    assert capsys.readouterr().out.splitlines()[-1].endswith("MISMATCH")
    assert main(["verify-llama", str(src), str(dst)]) == 1
    assert main(["verify-llama", str(src), str(tmp_path / "absent")]) == 2


def test_torch_bin_checkpoints_convert_too(tmp_path):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama = llama_folder(src, tie_word_embeddings=True)
    for file in src.glob("model*"):
        file.unlink()
    torch.save(llama.state_dict(), src / "pytorch_model.bin")  # holds lm_head.weight, tied: left out
    conversion = convert_llama(src, dst)
    assert conversion.dropped == ["lm_head.weight"]
    assert not list(dst.glob("*.bin")) and "lm_head.weight" not in folder_tensors(dst)
    assert_same_model(src, dst)


def test_overwrite_replaces_a_non_empty_destination(tmp_path):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama_folder(src)
    dst.mkdir()
    (dst / "old.txt").write_text("old")
    with pytest.raises(ConversionError, match="not empty.*overwrite"):
        convert_llama(src, dst)
    assert (dst / "old.txt").read_text() == "old"
    convert_llama(src, dst, overwrite=True)
    assert not (dst / "old.txt").exists() and (dst / "config.json").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama", "mta"]


def _edit_config(**changes):
    def edit(src: Path):
        config = json.loads((src / "config.json").read_text())
        (src / "config.json").write_text(json.dumps({**config, **changes}))
    return edit


def _remove(pattern: str):
    def remove(src: Path):
        for file in src.glob(pattern):
            file.unlink()
    return remove


def _truncate(src: Path):
    shard = sorted(src.glob("model-*.safetensors"))[2]
    shard.write_bytes(shard.read_bytes()[:-100])


def _pickled_object(src: Path):
    _remove("model*")(src)
    torch.save({"model.embed_tokens.weight": torch.zeros(2), "step": Path("x")}, src / "pytorch_model.bin")


BAD_INPUTS = {
    "no-config": (_remove("config.json"), {}, "has no config.json"),
    "config-not-json": (lambda src: (src / "config.json").write_text("{not json"), {}, "cannot read .*config.json"),
    "not-a-llama": (_edit_config(model_type="gpt2"), {}, "model_type 'gpt2'; this converter supports llama"),
    "no-weights": (_remove("model*"), {}, "no weights in"),
    "index-not-json": (lambda src: (src / "model.safetensors.index.json").write_text("{"), {}, "cannot read .*index"),
    "index-names-absent-file": (_remove("model-00002-*"), {}, "names weight files that are not in"),
    "truncated-shard": (_truncate, {}, "truncated or not a safetensors file"),
    "shapes-disagree": (_edit_config(intermediate_size=48), {}, r"shapes disagree .*mlp.gate_proj.weight is \[64, 32\]"),
    "tensors-missing": (_edit_config(num_hidden_layers=8), {}, r"missing \['model.layers.7"),
    "pickled-object": (_pickled_object, {}, "holds more than tensors"),
    "group-not-dividing-heads": (None, dict(head_mix_post_size=3), "head_mix_post_size=3 does not divide"),
    "layer-out-of-range": (None, dict(mta_layers=[2, 7]), r"mta_layers \[7\] out of range"),
    "even-kernel-both-padding": (None, dict(kq_conv_size=[3, 4]), "odd key size"),
    "unknown-option": (None, dict(kq_size=[3, 3]), "unknown MTA options"),
    "bad-new-dtype": (None, dict(new_dtype="int8"), "new_dtype must be one of"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input_is_refused_with_nothing_written(tmp_path, case):
    damage, options, message = BAD_INPUTS[case]
    src = tmp_path / "llama"
    llama_folder(src)
    if damage:
        damage(src)
    before = file_hashes(src)
    with pytest.raises(ConversionError, match=message):
        convert_llama(src, tmp_path / "out" / "mta", **options)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["llama"]
    assert file_hashes(src) == before


def test_destinations_overlapping_the_source_are_refused(tmp_path, capsys):
    src = tmp_path / "llama"
    llama_folder(src)
    before = file_hashes(src)
    for dst in (src, src / "mta", tmp_path):
        assert main(["convert-llama", str(src), str(dst), "--overwrite"]) == 2
        assert "overlaps the source" in capsys.readouterr().out
    assert file_hashes(src) == before


def test_an_exception_inside_the_staged_output_leaves_nothing(tmp_path):
    (tmp_path / "src").mkdir()
    with pytest.raises(RuntimeError, match="boom"):
        with staged_output(tmp_path / "src", tmp_path / "new" / "parents" / "dst") as staging:
            (staging / "half-written").write_text("x")
            raise RuntimeError("boom")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# Runs the real conversion in a child process, made to pause after its first shard so it can be killed there.
SLOW_CONVERSION = textwrap.dedent(
    """
    import sys, time
    import conversion.llama_conversion as convert

    copy = convert.copy_safetensors

    def copy_then_pause(*args):
        written = copy(*args)
        print("copied a shard", flush=True)
        time.sleep(120)
        return written

    convert.copy_safetensors = copy_then_pause
    convert.convert_llama(sys.argv[1], sys.argv[2])
    """
)


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_a_killed_conversion_leaves_no_destination(tmp_path, signum):
    src, dst = tmp_path / "llama", tmp_path / "mta"
    llama_folder(src)
    script = tmp_path / "slow.py"
    script.write_text(SLOW_CONVERSION)
    child = subprocess.Popen([sys.executable, str(script), str(src), str(dst)], cwd=Path(__file__).parents[1],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        line = child.stdout.readline()
        assert line == "copied a shard\n", child.stderr.read()[-3000:]
        [staging] = [p for p in tmp_path.iterdir() if PARTIAL_MARK in p.name]
        assert staging.name.startswith(".mta" + PARTIAL_MARK) and any(staging.iterdir())
        child.send_signal(signum)
        returncode = child.wait(timeout=60)
    finally:
        child.kill()
        child.communicate()
    leftovers = sorted(p.name for p in tmp_path.iterdir() if p.name not in ("llama", "slow.py"))
    if signum == signal.SIGTERM:
        assert returncode == 128 + signal.SIGTERM and leftovers == []  # cleaned up on the way out
    else:
        # SIGKILL cannot be caught: the hidden staging folder stays, never under DST's name, and does not
        # stand in the way of the next run.
        assert returncode == -signal.SIGKILL and leftovers == [staging.name]
        convert_llama(src, dst)
        assert (dst / "config.json").exists()
        shutil.rmtree(staging)
