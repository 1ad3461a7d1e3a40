"""The toy task example: the data generator's rules and the tokenizer."""

import string

import numpy as np
import pytest

from examples.toy_find_block import dataset, task, tokenizer


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
