"""`mta finetune`: end to end on tiny models, the Hub-ready folder it writes, the upload it would make, its errors."""

import json
from pathlib import Path

import torch
from peft import PeftModel
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

from conversion import retrofit_llama
from mta import demo, hub_folder
from mta.cli import main

from .test_save_load import logits_without_the_package
from .tiny import tiny_llama

TEXT = demo.TEXT * 3
CODE_FILES = ("configuration_mta.py", "modeling_mta.py", "mta_reference.py")
SMALL_RUN = ["--steps", "6", "--batch-size", "4", "--block-size", "32", "--logging-steps", "1"]


def finetune(tmp_path, *options) -> int:
    (tmp_path / "notes.txt").write_text(TEXT)
    return main(["finetune", "--data", str(tmp_path / "notes.txt"), "--data-cache", str(tmp_path / "cache"),
                 *SMALL_RUN, *options])


def test_tiny_lora_finetune_writes_a_hub_ready_folder(tmp_path, capsys):
    out = tmp_path / "tiny-mta"
    # float32 also on a GPU (where bf16 would be the default), so that the reloads below are exact.
    assert finetune(tmp_path, "--tiny", "--train", "lora", "--precision", "fp32", "--output", str(out)) == 0
    assert "trainable parameters" in capsys.readouterr().out
    assert {p.name for p in tmp_path.iterdir()} - {"cache"} == {"notes.txt", "tiny-mta"}  # nothing else left behind

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {"AutoConfig": "configuration_mta.MTAConfig", "AutoModel": "modeling_mta.MTAModel",
                                  "AutoModelForCausalLM": "modeling_mta.MTAForCausalLM"}
    assert all((out / name).is_file() for name in CODE_FILES)
    card = (out / "README.md").read_text()
    for expected in ("Key-query convolutions (pre-softmax 6 x 11; queries x keys) in layers 2 (0-based)",
                     "| `head_mix_post_size` | `2` |", "tiny random Llama", "`--train lora`",
                     'from_pretrained("path/to/this/folder", trust_remote_code=True)', "UTF-8 bytes", "adapter/"):
        assert expected in card, expected
    log = json.loads((out / "training_log.json").read_text())
    assert [entry["step"] for entry in log["losses"]] == list(range(1, 7))
    assert log["world_size"] == 1 and log["train_mode"] == "lora"

    ids = torch.tensor([list(b"Multi-Token Attention")])
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        expected = merged(ids).logits
        adapter = PeftModel.from_pretrained(retrofit_llama(demo.tiny_llama(0)), out / "adapter").eval()
        torch.testing.assert_close(adapter(ids).logits, expected, atol=1e-5, rtol=1e-5)
        assert (retrofit_llama(demo.tiny_llama(0))(ids).logits - expected).abs().max() > 1e-3  # it did train
        hidden = AutoModel.from_pretrained(out)(ids).last_hidden_state
    assert hidden.shape == (1, ids.shape[1], merged.config.hidden_size)
    torch.testing.assert_close(logits_without_the_package(out, ids, tmp_path), expected, atol=0, rtol=0)


def char_tokenizer(text: str) -> PreTrainedTokenizerFast:
    """A tokenizer built here: one token per character of `text`, plus EOS."""
    vocab = {ch: i for i, ch in enumerate(sorted(set(text)))}
    vocab["</s>"] = len(vocab)
    backend = Tokenizer(models.WordLevel(vocab, unk_token="</s>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>")


def test_a_llama_folder_with_a_tokenizer_is_retrofitted_and_keeps_its_tokenizer(tmp_path):
    tokenizer = char_tokenizer(TEXT)
    tiny_llama(vocab_size=len(tokenizer)).save_pretrained(tmp_path / "llama")
    tokenizer.save_pretrained(tmp_path / "llama")
    out = tmp_path / "out"
    assert finetune(tmp_path, "--model", str(tmp_path / "llama"), "--kq-conv-size", "3x5", "--output", str(out)) == 0
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.config.kq_conv_size == [3, 5] and model.config.mta_layers == [2, 6]
    reloaded = AutoTokenizer.from_pretrained(out)
    assert reloaded("MTA")["input_ids"] == tokenizer("MTA")["input_ids"]
    card = (out / "README.md").read_text()
    assert "`--train mta`" in card and 'AutoTokenizer.from_pretrained("path/to/this/folder")' in card
    assert not (out / "adapter").exists()


class FakeHubApi:
    """Records what `push_folder` would send; nothing leaves this machine."""

    calls = []

    def create_repo(self, repo_id, **options):
        self.calls.append(("create_repo", repo_id, options))

    def upload_folder(self, *, repo_id, folder_path, **options):
        files = sorted(str(p.relative_to(folder_path)) for p in Path(folder_path).rglob("*"))
        self.calls.append(("upload_folder", repo_id, folder_path, files, options))
        return f"https://hub.invalid/{repo_id}/commit/0"


def test_push_to_hub_would_upload_exactly_the_folder_written(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(hub_folder, "HfApi", FakeHubApi)
    FakeHubApi.calls.clear()
    out = tmp_path / "out"
    assert finetune(tmp_path, "--tiny", "--output", str(out), "--push-to-hub", "me/tiny-mta", "--private") == 0
    create, upload = FakeHubApi.calls
    assert create == ("create_repo", "me/tiny-mta", dict(repo_type="model", private=True, exist_ok=True))
    assert upload[:3] == ("upload_folder", "me/tiny-mta", str(out))
    assert upload[3] == sorted(p.name for p in out.iterdir())
    assert {"README.md", "config.json", "model.safetensors", *CODE_FILES} <= set(upload[3])
    assert 'from_pretrained("me/tiny-mta", trust_remote_code=True)' in (out / "README.md").read_text()
    assert "uploaded to https://hub.invalid/me/tiny-mta/commit/0" in capsys.readouterr().out


def test_bad_options_are_refused_before_training(tmp_path, capsys):
    tiny_llama().save_pretrained(tmp_path / "llama")
    assert main(["convert-llama", str(tmp_path / "llama"), str(tmp_path / "mta")]) == 0
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("x")
    cases = [
        (["--model", str(tmp_path / "mta"), "--kq-conv-size", "3x3", "--tokenizer", "bytes"], "apply only to Llama"),
        (["--model", str(tmp_path / "llama")], "has no tokenizer"),
        (["--model", str(tmp_path / "llama"), "--tokenizer", "bytes"], "need a vocabulary of 256"),
        (["--model", str(tmp_path / "nowhere")], "has no config.json"),
    ]
    for options, message in cases:
        capsys.readouterr()
        assert finetune(tmp_path, *options, "--output", str(tmp_path / "new")) == 2, options
        assert message in capsys.readouterr().err, message
    assert finetune(tmp_path, "--tiny", "--output", str(tmp_path / "full")) == 2
    assert "not empty" in capsys.readouterr().err
    assert finetune(tmp_path, "--model", str(tmp_path / "mta"), "--output", str(tmp_path / "mta" / "out")) == 2
    assert "overlaps the source" in capsys.readouterr().err
    assert not (tmp_path / "new").exists() and (tmp_path / "full" / "keep.txt").exists()
