"""The toy task example: the data generator's rules, the tokenizer, scoring, resuming, and a smoke run."""

import json
import string
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from examples.toy_find_block import dataset, run_all, task, tokenizer
from examples.toy_find_block.evaluate import TARGET_LENGTH, exact_match_errors
from examples.toy_find_block.models import build_model
from examples.toy_find_block.settings import Settings
from examples.toy_find_block.train import main as train_main
from examples.toy_find_block.train import Run, train_one

TINY_RUN = dict(size="tiny", batch_size=8, train_size=120, test_size=24, eval_every=3, log_every=3)


@pytest.fixture(autouse=True)
def _restore_torch_settings():
    """Training switches on deterministic algorithms process-wide; give the other tests their defaults back."""
    deterministic = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    yield
    torch.use_deterministic_algorithms(deterministic[0], warn_only=deterministic[1])
    torch.utils.deterministic.fill_uninitialized_memory = fill


def parse(text: str) -> tuple[list[str], str, str]:
    """(blocks, query, answer) of an example, read with plain string operations."""
    prompt, answer = text[:-5], text[-5:]
    blocks, query = prompt.split("#")
    return blocks.split("."), query, answer


def check_rules(text: str) -> None:
    assert len(text) == 319
    assert text.count("#") == 1
    blocks, query, answer = parse(text)
    assert len(blocks) == 52 and len(query) == 2 and len(set(query)) == 2
    assert len(set(blocks)) == 52, "blocks repeat"
    for block in blocks:
        assert len(block) == 5 and len(set(block)) == 5 and set(block) <= set(string.ascii_lowercase)
    holding = [block for block in blocks if set(query) <= set(block)]
    assert holding == [answer], f"blocks holding {query!r}: {holding}, answer {answer!r}"


@pytest.fixture(scope="module")
def examples() -> list[str]:
    return [task.to_text(row) for row in task.generate_examples(np.random.default_rng(7), 2000)]


def test_every_example_follows_the_rules(examples):
    for text in examples:
        check_rules(text)


def test_answers_and_queries_are_spread_out(examples):
    parsed = [parse(text) for text in examples]
    positions = {blocks.index(answer) for blocks, _, answer in parsed}
    assert len(positions) >= 45  # of 52: the answer block sits anywhere
    in_order = np.mean([answer.index(query[0]) < answer.index(query[1]) for _, query, answer in parsed])
    assert 0.4 < in_order < 0.6  # query letters come in either order
    first_letters = {answer[0] for _, _, answer in parsed}
    assert len(first_letters) == 26


def test_the_rule_checker_catches_broken_examples(examples):
    blocks, query, answer = parse(examples[0])
    other = next(i for i, b in enumerate(blocks) if b != answer)
    broken = list(blocks)
    broken[other] = query + "".join(c for c in string.ascii_lowercase if c not in query)[:3]  # a second holder
    with pytest.raises(AssertionError, match="blocks holding"):
        check_rules(".".join(broken) + "#" + query + answer)
    with pytest.raises(AssertionError):
        check_rules(examples[0][:-1] + examples[0][-2])  # an answer that is no block


def test_generation_is_seeded():
    a = task.generate_examples(np.random.default_rng(3), 50)
    b = task.generate_examples(np.random.default_rng(3), 50)
    c = task.generate_examples(np.random.default_rng(4), 50)
    assert a.dtype == np.uint8 and a.shape == (50, 319)
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_data_set_is_seeded_and_train_and_test_are_disjoint(tmp_path):
    first = dataset.ensure_dataset(tmp_path / "a", seed=5, train_size=3000, test_size=500)
    again = dataset.ensure_dataset(tmp_path / "b", seed=5, train_size=3000, test_size=500)
    train, test = dataset.load_split(first, "train"), dataset.load_split(first, "test")
    assert train.shape == (3000, 319) and test.shape == (500, 319)
    assert np.array_equal(train, dataset.load_split(again, "train"))
    assert np.array_equal(test, dataset.load_split(again, "test"))
    train_blocks = {row[: task.BLOCKS_LENGTH].tobytes() for row in train}
    test_blocks = {row[: task.BLOCKS_LENGTH].tobytes() for row in test}
    assert len(train_blocks) == 3000 and len(test_blocks) == 500 and not train_blocks & test_blocks
    for row in np.concatenate([train[:200], test[:200]]):
        check_rules(task.to_text(row))


def test_repeated_blocks_are_dropped_in_stream_order(monkeypatch):
    real = task.generate_examples

    def with_repeats(rng, count):  # every chunk repeats its first 10 examples at its end
        rows = real(rng, count)
        rows[-10:] = rows[:10]
        return rows

    monkeypatch.setattr(dataset, "generate_examples", with_repeats)
    monkeypatch.setattr(dataset, "CHUNK_SIZE", 40)
    rows = dataset.distinct_examples(seed=1, count=100)
    chunk = with_repeats(np.random.default_rng([1, 0]), 40)
    assert np.array_equal(rows[:30], chunk[:30])  # the 10 repeats at positions 30..39 are skipped
    assert len({row[: task.BLOCKS_LENGTH].tobytes() for row in rows}) == 100


def test_worker_processes_make_the_same_data():
    count = dataset.CHUNK_SIZE + 100
    serial, parallel = (dataset.distinct_examples(2, count, workers=w) for w in (1, 2))
    assert np.array_equal(serial, parallel)


def test_train_order_visits_each_example_once_per_epoch():
    order = dataset.TrainOrder(train_size=100, batch_size=8, seed=3)
    assert order.steps_per_epoch == 12
    epoch0 = np.concatenate([order.indices(s) for s in range(12)])
    epoch1 = np.concatenate([order.indices(s) for s in range(12, 24)])
    assert len(set(epoch0.tolist())) == 96 and len(set(epoch1.tolist())) == 96
    assert not np.array_equal(epoch0, epoch1)
    assert np.array_equal(dataset.TrainOrder(100, 8, seed=3).indices(13), order.indices(13))
    assert not np.array_equal(dataset.TrainOrder(100, 8, seed=4).indices(0), order.indices(0))


def test_tokenizer_round_trip(examples):
    assert tokenizer.VOCAB_SIZE == 32 and tokenizer.VOCAB_SIZE % 8 == 0
    text = examples[0]
    ids = tokenizer.encode(text)
    assert len(ids) == 321 and ids[0] == tokenizer.BOS_ID and ids[-1] == tokenizer.EOS_ID
    assert tokenizer.decode(ids) == "<bos>" + text + "<eos>"
    assert tokenizer.decode(ids[1:-1]) == text
    rows = np.frombuffer("".join(examples[:5]).encode(), dtype=np.uint8).reshape(5, 319)
    assert tokenizer.encode_rows(rows).tolist() == [tokenizer.encode(t) for t in examples[:5]]
    assert len({tokenizer.encode(c)[1] for c in string.ascii_lowercase + ".#"}) == 28


@pytest.mark.parametrize("bad", ["abc!", "ABC", "é"])
def test_tokenizer_refuses_unknown_characters(bad):
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer.encode(bad)
    with pytest.raises(ValueError, match="vocabulary"):
        tokenizer.decode([0, tokenizer.VOCAB_SIZE - 1])


class NextTokenOracle(torch.nn.Module):
    """Predicts each next token from the sequence itself; `wrong` rows get one answer letter wrong."""

    def __init__(self, full_tokens: torch.Tensor, wrong_rows: list[int]):
        super().__init__()
        self.full_tokens, self.wrong_rows = full_tokens, wrong_rows

    def forward(self, input_ids, logits_to_keep, use_cache):
        assert input_ids.shape[1] == 320 and not use_cache
        rows = [int(torch.nonzero((self.full_tokens[:, :-1] == input_ids[i]).all(1))[0]) for i in range(len(input_ids))]
        following = self.full_tokens[rows, 1:][:, -logits_to_keep:].clone()
        for i, row in enumerate(rows):
            if row in self.wrong_rows:
                following[i, 2] = (following[i, 2] + 1) % 26
        return SimpleNamespace(logits=torch.nn.functional.one_hot(following, tokenizer.VOCAB_SIZE).float())


def test_exact_match_scores_the_answer_and_eos_positions(examples):
    rows = np.frombuffer("".join(examples[:10]).encode(), dtype=np.uint8).reshape(10, 319)
    tokens = torch.from_numpy(tokenizer.encode_rows(rows))
    perfect = exact_match_errors(NextTokenOracle(tokens, []), tokens, 4, torch.no_grad)
    assert perfect["wrong"] == 0 and perfect["error"] == 0.0 and perfect["examples"] == 10
    assert perfect["loss"] == pytest.approx(torch.nn.functional.cross_entropy(
        torch.eye(tokenizer.VOCAB_SIZE)[:1], torch.tensor([0])).item())
    two_wrong = exact_match_errors(NextTokenOracle(tokens, [1, 7]), tokens, 4, torch.no_grad)
    assert two_wrong["wrong"] == 2 and two_wrong["error"] == 0.2
    assert two_wrong["token_error"] == pytest.approx(2 / (10 * TARGET_LENGTH))


def test_baseline_and_mta_start_from_the_same_llama_weights():
    baseline, mta = build_model("baseline", 11, "tiny"), build_model("mta", 11, "tiny")
    mta_params = dict(mta.named_parameters())
    for name, param in baseline.named_parameters():
        assert torch.equal(param, mta_params.pop(name)), name
    assert sorted(mta_params) == [f"model.layers.{i}.self_attn.kq_conv.weight" for i in range(2)]
    assert mta.config.kq_conv_size == [2, 9] and mta.config.head_mix_post_size is None and not mta.config.group_norm
    assert baseline.config.attention_dropout == mta.config.attention_dropout == 0.1
    assert not torch.equal(build_model("baseline", 12, "tiny").lm_head.weight, baseline.lm_head.weight)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does(tmp_path):
    def settings(work: str, steps: int, resume: bool = False) -> Settings:
        return Settings(**TINY_RUN, steps=steps, resume=resume, work_dir=tmp_path / work, out=tmp_path / work / "out")

    # The baseline: the same code path as MTA, four times faster on a CPU.
    train_one("baseline", 3, settings("straight", 6), "cpu")
    train_one("baseline", 3, settings("resumed", 3), "cpu")
    with pytest.raises(FileExistsError, match="--resume"):
        train_one("baseline", 3, settings("resumed", 6), "cpu")
    final = train_one("baseline", 3, settings("resumed", 6, resume=True), "cpu")

    straight = torch.load(tmp_path / "straight/checkpoints/baseline-seed3.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed/checkpoints/baseline-seed3.pt", weights_only=False)
    assert resumed["step"] == straight["step"] == 6
    for name, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][name]), name
    progress = json.loads((tmp_path / "resumed/out/baseline-seed3.json").read_text())
    assert progress["status"] == "finished" and [e["step"] for e in progress["evals"]] == [3, 6]
    assert progress["final"] == final and final["error"] == straight["evals"][-1]["error"]


def test_a_compiled_run_checkpoints_under_the_model_parameter_names(tmp_path):
    settings = Settings(**TINY_RUN, compile=True, work_dir=tmp_path, out=tmp_path / "out")
    compiled = Run("mta", 3, settings, torch.device("cpu"))
    assert compiled.net is not compiled.model  # the steps go through torch.compile's wrapper
    compiled.save_checkpoint()
    saved = torch.load(compiled.checkpoint_path, weights_only=False)["model"]
    assert list(saved) == list(build_model("mta", 3, "tiny").state_dict())  # no "_orig_mod." prefix
    eager = Run("mta", 3, Settings(**TINY_RUN, work_dir=tmp_path, out=tmp_path / "out"), torch.device("cpu"))
    eager.load_checkpoint()  # an eager session resumes a compiled one
    assert eager.net is eager.model


@pytest.mark.parametrize(
    "main, argv, words",
    [
        (train_main, ["--model", "mta", "--seed", "0", "--batch-size", "0"], ["--batch-size", "at least 1"]),
        (train_main, ["--model", "mta", "--seed", "0", "--max-minutes", "-1"], ["--max-minutes", "positive"]),
        (train_main, ["--model", "transformer", "--seed", "0"], ["--model", "baseline", "mta"]),
        (run_all.main, ["--seeds", "1", "1"], ["repeat a run"]),
        (dataset.main, ["--work-dir", "unused", "--seed", "0", "--train-size", "0", "--test-size", "5"], ["positive"]),
    ],
)
def test_bad_settings_are_refused_with_the_flag_name(main, argv, words, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert all(word in err for word in words), err


def test_smoke_run_all_trains_both_models_and_writes_the_table(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["--seeds", "5", "--steps", "4", "--work-dir", str(tmp_path / "work"), "--out", str(out)]
    argv += [f"--{k.replace('_', '-')}={v}" for k, v in TINY_RUN.items() if k != "eval_every"] + ["--eval-every", "2"]
    assert run_all.main(argv) == 0
    printed = capsys.readouterr().out

    summary = json.loads((out / "results.json").read_text())
    assert [(r["model"], r["seed"], r["steps"], r["status"]) for r in summary["runs"]] == [
        ("baseline", 5, 4, "finished"), ("mta", 5, 4, "finished")]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["baseline-seed5.json", "mta-seed5.json", "results.json", "results.md"]
    for r in summary["runs"]:
        run = json.loads((out / f"{r['model']}-seed5.json").read_text())
        assert [e["step"] for e in run["evals"]] == [2, 4]
        assert r["error"] == run["final"]["error"] and 0.0 <= r["error"] <= 1.0
        assert r["examples"] == 24 and r["wrong"] == round(r["error"] * 24)
        assert (tmp_path / "work/checkpoints" / f"{r['model']}-seed5.pt").exists()
    assert summary["means"]["mta"]["error"] == summary["runs"][1]["error"]
    assert summary["common_step"] == 4
    table = (out / "results.md").read_text()
    assert table in printed
    assert "| baseline | 5 | 4 |" in table and "| mta | 5 | 4 |" in table and "**mta mean**" in table
