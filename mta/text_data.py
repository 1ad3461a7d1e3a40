"""Local text for causal-LM fine-tuning: .txt / .jsonl files cut into equal blocks of token ids.

A .txt file is one document; a .jsonl file holds one document per line, in a text field. The
documents are tokenized, joined (each followed by the tokenizer's end-of-sequence token, if it
has one) and cut into blocks of `block_size` tokens, as Transformers' causal-LM examples do; the
model shifts the labels, so a block's labels are its input ids. With `datasets` installed the
work goes through `datasets.load_dataset(...).map(...)` (cached, memory-mapped); without it the
same functions run over the documents in plain Python, giving the same blocks.
"""

import importlib.util
import json
from functools import partial
from pathlib import Path

from .finetune_errors import FinetuneError

# Documents tokenized and cut together; `datasets` and the plain path use the same grouping, so
# the leftover tokens that do not fill a block are dropped at the same places.
DOCUMENTS_PER_BATCH = 1000
FILE_KINDS = {".txt": "text", ".jsonl": "json"}


class ByteTokens:
    """Token ids are the UTF-8 bytes of the text (0..255): for models built here without a tokenizer."""

    name = "UTF-8 bytes as token ids"
    vocab_size = 256
    eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode())


class TokenizerTokens:
    """A Transformers tokenizer, as the special tokens it adds itself say, plus EOS after each document."""

    def __init__(self, tokenizer, name: str):
        self.tokenizer = tokenizer
        self.name = name
        self.vocab_size = len(tokenizer)
        self.eos_token_id = tokenizer.eos_token_id

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text)["input_ids"]


def tokenize_batch(tokens, text_field: str, batch: dict) -> dict:
    """{text_field: [str]} -> {"input_ids": [[int]]}, each document followed by EOS when there is one."""
    eos = [] if tokens.eos_token_id is None else [tokens.eos_token_id]
    texts = batch[text_field]
    bad = [type(text).__name__ for text in texts if not isinstance(text, str)]
    if bad:
        raise FinetuneError(f"the field {text_field!r} must hold text, found {bad[0]}")
    return {"input_ids": [tokens.encode(text) + eos for text in texts]}


def group_blocks(block_size: int, batch: dict) -> dict:
    """Join a batch of tokenized documents and cut it into blocks of `block_size`; the remainder is dropped."""
    joined = [token for ids in batch["input_ids"] for token in ids]
    blocks = [joined[start : start + block_size] for start in range(0, len(joined) - block_size + 1, block_size)]
    return {"input_ids": blocks, "labels": [list(block) for block in blocks]}


def file_kind(paths: list[Path]) -> str:
    """'text' or 'json' (the `datasets` loader name) for a list of existing files of one kind."""
    if not paths:
        raise FinetuneError("no data files given")
    for path in paths:
        if not path.is_file():
            raise FinetuneError(f"data file {path} does not exist")
    kinds = {FILE_KINDS.get(path.suffix.lower()) for path in paths}
    if None in kinds:
        raise FinetuneError(f"data files must be .txt (one document each) or .jsonl (one document a line), got {paths}")
    if len(kinds) > 1:
        raise FinetuneError("data files must all be .txt or all be .jsonl, not a mix")
    return kinds.pop()


def read_documents(kind: str, paths: list[Path], text_field: str) -> list[str]:
    """The documents of the files, read without `datasets`: the `text_field` column `load_dataset` would give."""
    if kind == "text":
        return [path.read_text(encoding="utf-8") for path in paths]
    documents = []
    for path in paths:
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except ValueError as error:
                raise FinetuneError(f"{path}:{number} is not a JSON object: {error}") from error
            if not isinstance(record, dict) or text_field not in record:
                raise FinetuneError(f"{path}:{number} has no field {text_field!r} (choose it with --text-field)")
            documents.append(record[text_field])
    return documents


def has_datasets() -> bool:
    return importlib.util.find_spec("datasets") is not None


def load_blocks(paths, tokens, block_size: int, text_field: str = "text", use_datasets: bool | None = None,
                cache_dir: str | None = None):
    """Training blocks {"input_ids", "labels"} from local files: a `datasets.Dataset`, or a list without `datasets`.

    `use_datasets` None means: whenever `datasets` is installed. `cache_dir` is where `datasets` keeps
    its processed copies (default: its own cache).
    """
    paths = [Path(p) for p in paths]
    if block_size < 2:
        raise FinetuneError(f"the block size must be at least 2 tokens, got {block_size}")
    kind = file_kind(paths)
    field = "text" if kind == "text" else text_field
    tokenize, cut = partial(tokenize_batch, tokens, field), partial(group_blocks, block_size)
    if use_datasets is None:
        use_datasets = has_datasets()
    if use_datasets:
        blocks = _blocks_with_datasets(kind, paths, field, tokenize, cut, cache_dir)
    else:
        blocks = []
        documents = read_documents(kind, paths, field)
        for start in range(0, len(documents), DOCUMENTS_PER_BATCH):
            grouped = cut(tokenize({field: documents[start : start + DOCUMENTS_PER_BATCH]}))
            blocks.extend({"input_ids": ids, "labels": labels}
                          for ids, labels in zip(grouped["input_ids"], grouped["labels"], strict=True))
    if len(blocks) == 0:
        raise FinetuneError(f"{', '.join(map(str, paths))} holds fewer tokens than one block of {block_size}: "
                        "give more text or a smaller --block-size")
    return blocks


def _blocks_with_datasets(kind, paths, field, tokenize, cut, cache_dir):
    import datasets

    options = dict(sample_by="document") if kind == "text" else {}
    try:
        raw = datasets.load_dataset(kind, data_files=[str(p) for p in paths], split="train", cache_dir=cache_dir,
                                    **options)
    except datasets.exceptions.DatasetGenerationError as error:
        raise FinetuneError(f"cannot read {', '.join(map(str, paths))}: {error.__cause__ or error}") from error
    if field not in raw.column_names:
        raise FinetuneError(f"the records of {paths[0]} have no field {field!r} (they have {raw.column_names}; "
                        "choose one with --text-field)")
    tokenized = raw.map(tokenize, batched=True, batch_size=DOCUMENTS_PER_BATCH, remove_columns=raw.column_names,
                        desc="tokenizing")
    return tokenized.map(cut, batched=True, batch_size=DOCUMENTS_PER_BATCH, desc="cutting into blocks")
