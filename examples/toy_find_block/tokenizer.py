"""Character tokenizer of the toy task: one token per letter or separator, plus BOS and EOS.

As in the official toy task, a sequence is BOS + its 319 characters + EOS, and the vocabulary is
rounded up to a multiple of 8 (unused ids at the end), a shape tensor cores like.
"""

import numpy as np

from .task import ALPHABET, BLOCK_SEPARATOR, QUERY_SEPARATOR

SYMBOLS = ALPHABET + BLOCK_SEPARATOR + QUERY_SEPARATOR
BOS_ID = len(SYMBOLS)
EOS_ID = BOS_ID + 1
VOCAB_SIZE = -(-(EOS_ID + 1) // 8) * 8
SPECIAL_NAMES = {BOS_ID: "<bos>", EOS_ID: "<eos>"}

# ASCII code -> token id; -1 marks characters that are not in the vocabulary.
_IDS_BY_CODE = np.full(256, -1, dtype=np.int16)
_IDS_BY_CODE[np.frombuffer(SYMBOLS.encode(), dtype=np.uint8)] = np.arange(len(SYMBOLS))


def encode_rows(rows: np.ndarray) -> np.ndarray:
    """ASCII rows (n, L) uint8 -> token ids (n, L + 2) int64: BOS, the characters, EOS."""
    ids = _IDS_BY_CODE[rows]
    if (ids < 0).any():
        bad = sorted({chr(c) for c in rows[ids < 0].tolist()})
        raise ValueError(f"characters outside the toy task's vocabulary {SYMBOLS!r}: {bad}")
    n = rows.shape[0]
    return np.concatenate(
        [np.full((n, 1), BOS_ID), ids.astype(np.int64), np.full((n, 1), EOS_ID)], axis=1
    )


def encode(text: str) -> list[int]:
    """A string -> its token ids with BOS and EOS."""
    try:
        rows = np.frombuffer(text.encode("ascii"), dtype=np.uint8)[None]
    except UnicodeEncodeError as error:
        raise ValueError(f"non-ASCII character in {text!r}; the vocabulary is {SYMBOLS!r}") from error
    return encode_rows(rows)[0].tolist()


def decode(ids: list[int]) -> str:
    """Token ids -> text; BOS and EOS are written as <bos> and <eos>."""
    out = []
    for i in ids:
        if i in SPECIAL_NAMES:
            out.append(SPECIAL_NAMES[i])
        elif 0 <= i < len(SYMBOLS):
            out.append(SYMBOLS[i])
        else:
            raise ValueError(f"token id {i} is not in the vocabulary (0..{EOS_ID})")
    return "".join(out)
