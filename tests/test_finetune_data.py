"""mta.text_data: local .txt / .jsonl files -> equal blocks of token ids, with and without `datasets`."""

import json

import pytest

from mta.finetune_errors import FinetuneError
from mta.text_data import ByteTokens, load_blocks


class EosBytes(ByteTokens):
    """Byte tokens with an end-of-sequence id, as a real tokenizer has."""

    eos_token_id = 255


def write_jsonl(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records) + "\n")  # a blank last line is allowed
    return path


def as_lists(blocks):
    return [dict(block) for block in blocks]


@pytest.mark.parametrize("tokens", [ByteTokens(), EosBytes()], ids=["bytes", "bytes+eos"])
def test_text_and_jsonl_give_the_same_blocks_with_and_without_datasets(tmp_path, tokens):
    pytest.importorskip("datasets")
    texts = ["first document, with some words.", "the second one\nhas two lines", "third"]
    (tmp_path / "a.txt").write_text(texts[0])
    (tmp_path / "b.txt").write_text(texts[1])
    write_jsonl(tmp_path / "c.jsonl", [{"body": t, "id": i} for i, t in enumerate(texts)])
    eos = [] if tokens.eos_token_id is None else [tokens.eos_token_id]
    for files, field, documents in (([tmp_path / "a.txt", tmp_path / "b.txt"], "text", texts[:2]),
                                    ([tmp_path / "c.jsonl"], "body", texts)):
        with_datasets = load_blocks(files, tokens, 8, field, use_datasets=True, cache_dir=str(tmp_path / "cache"))
        plain = load_blocks(files, tokens, 8, field, use_datasets=False)
        assert as_lists(with_datasets) == plain
        stream = [t for doc in documents for t in list(doc.encode()) + eos]
        expected = [stream[i : i + 8] for i in range(0, len(stream) - 7, 8)]
        assert [b["input_ids"] for b in plain] == expected
        assert all(b["labels"] == b["input_ids"] for b in plain)


@pytest.mark.parametrize("use_datasets", [False, True], ids=["plain", "datasets"])
def test_bad_data_is_refused_with_a_clear_error(tmp_path, use_datasets):
    if use_datasets:
        pytest.importorskip("datasets")
    tokens, cache = ByteTokens(), str(tmp_path / "cache")
    (tmp_path / "short.txt").write_text("tiny")
    write_jsonl(tmp_path / "other.jsonl", [{"body": "some text here"}])
    (tmp_path / "data.csv").write_text("a,b\n")
    cases = [
        ([tmp_path / "missing.txt"], {}, "does not exist"),
        ([tmp_path / "data.csv"], {}, ".txt .* or .jsonl"),
        ([tmp_path / "short.txt", tmp_path / "other.jsonl"], {}, "not a mix"),
        ([tmp_path / "short.txt"], {}, "fewer tokens than one block of 16"),
        ([tmp_path / "other.jsonl"], {"text_field": "text"}, "no field 'text'"),
        ([tmp_path / "short.txt"], {"block_size": 1}, "at least 2"),
    ]
    for files, options, message in cases:
        options = {"block_size": 16, **options}
        with pytest.raises(FinetuneError, match=message):
            load_blocks(files, tokens, use_datasets=use_datasets, cache_dir=cache, **options)


@pytest.mark.parametrize("use_datasets", [False, True], ids=["plain", "datasets"])
def test_jsonl_lines_that_are_not_text_records_are_refused(tmp_path, use_datasets):
    if use_datasets:
        pytest.importorskip("datasets")
    options = dict(use_datasets=use_datasets, cache_dir=str(tmp_path / "cache"))
    (tmp_path / "bad.jsonl").write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(FinetuneError, match="bad.jsonl" + (":2 is not a JSON object" if not use_datasets else "")):
        load_blocks([tmp_path / "bad.jsonl"], ByteTokens(), 4, **options)
    write_jsonl(tmp_path / "number.jsonl", [{"text": 3}])
    with pytest.raises(FinetuneError, match="must hold text"):
        load_blocks([tmp_path / "number.jsonl"], ByteTokens(), 4, **options)
