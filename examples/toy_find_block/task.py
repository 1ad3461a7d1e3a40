"""The task's text format and a vectorised, seeded generator of its examples.

An example is one line of exactly `SEQUENCE_LENGTH` characters:

    <52 blocks of 5 distinct letters joined by "."> "#" <2 query letters> <answer block>

e.g. "dklsr.gpamx.rmzxq...#ga" followed by "gpamx". Exactly one block contains both query
letters (the query letters are drawn from it, in random order); the answer is that block, as
written in the sequence. The blocks of one example are distinct. This is the official toy task's
format (facebookresearch/RAM, projects/mta/toy_task, pad length 319): 52 blocks is what fills
319 characters exactly, so no padding character is ever needed.

Examples are arrays of ASCII codes (uint8), one row per example, so that a million of them
take a few seconds to make and 319 MB to hold.
"""

import numpy as np

ALPHABET = "abcdefghijklmnopqrstuvwxyz"
BLOCK_SEPARATOR = "."
QUERY_SEPARATOR = "#"
BLOCK_LENGTH = 5
QUERY_LENGTH = 2
SEQUENCE_LENGTH = 319
# As many blocks as fit before "#", the query and the answer: (319 - 5 - 2 - 1 + 1) // 6 = 52.
NUM_BLOCKS = (SEQUENCE_LENGTH - BLOCK_LENGTH - QUERY_LENGTH - len(QUERY_SEPARATOR) + 1) // (BLOCK_LENGTH + 1)
BLOCKS_LENGTH = NUM_BLOCKS * (BLOCK_LENGTH + 1) - 1  # the blocks and the separators between them
PROMPT_LENGTH = BLOCKS_LENGTH + len(QUERY_SEPARATOR) + QUERY_LENGTH  # everything before the answer
if PROMPT_LENGTH + BLOCK_LENGTH != SEQUENCE_LENGTH:
    raise AssertionError(f"the blocks do not fill {SEQUENCE_LENGTH} characters exactly")

_LETTER_CODES = np.frombuffer(ALPHABET.encode(), dtype=np.uint8)
# Block letters as one integer each (base 26), to compare whole blocks at once.
_BLOCK_CODE_WEIGHTS = len(ALPHABET) ** np.arange(BLOCK_LENGTH - 1, -1, -1, dtype=np.int64)


def sample_blocks(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` blocks of BLOCK_LENGTH distinct letter indices (0..25), uniform over ordered choices.

    Uniform tuples with a repeated letter are rejected (a third of them), which keeps every
    remaining ordering equally likely, like drawing letters without replacement.
    """
    blocks = np.empty((count, BLOCK_LENGTH), dtype=np.int8)
    filled = 0
    while filled < count:
        wanted = count - filled
        candidates = rng.integers(0, len(ALPHABET), size=(wanted * 3 // 2 + 16, BLOCK_LENGTH), dtype=np.int8)
        distinct = (np.diff(np.sort(candidates, axis=1), axis=1) != 0).all(axis=1)
        accepted = candidates[distinct][:wanted]
        blocks[filled : filled + len(accepted)] = accepted
        filled += len(accepted)
    return blocks


def _letter_sets(letters: np.ndarray) -> np.ndarray:
    """The set of letters of each row of the last axis, as a 26-bit mask."""
    return np.bitwise_or.reduce(np.left_shift(1, letters, dtype=np.int32), axis=-1)


def _repeats(blocks: np.ndarray) -> np.ndarray:
    """(n, NUM_BLOCKS) bool: blocks equal to another block of the same example (all but one copy marked)."""
    codes = blocks.astype(np.int64) @ _BLOCK_CODE_WEIGHTS  # (n, B)
    order = np.argsort(codes, axis=1, kind="stable")
    sorted_codes = np.take_along_axis(codes, order, axis=1)
    repeated_sorted = np.zeros_like(codes, dtype=bool)
    repeated_sorted[:, 1:] = sorted_codes[:, 1:] == sorted_codes[:, :-1]
    repeated = np.zeros_like(repeated_sorted)
    np.put_along_axis(repeated, order, repeated_sorted, axis=1)
    return repeated


def generate_examples(rng: np.random.Generator, count: int) -> np.ndarray:
    """`count` examples as ASCII codes, shape (count, SEQUENCE_LENGTH), dtype uint8."""
    rows = np.arange(count)
    blocks = sample_blocks(rng, count * NUM_BLOCKS).reshape(count, NUM_BLOCKS, BLOCK_LENGTH)
    target = rng.integers(0, NUM_BLOCKS, size=count)
    # QUERY_LENGTH distinct positions inside the target block, in random order.
    positions = np.argsort(rng.random((count, BLOCK_LENGTH)), axis=1)[:, :QUERY_LENGTH]
    query = blocks[rows[:, None], target[:, None], positions]

    # Redraw every other block that also holds the whole query, or repeats another block, until none
    # does; only the examples that had a redraw need another look.
    query_set = _letter_sets(query)[:, None]
    is_target = np.arange(NUM_BLOCKS)[None, :] == target[:, None]
    todo = rows
    while todo.size:
        candidate = blocks[todo]
        holds_query = (_letter_sets(candidate) & query_set[todo]) == query_set[todo]
        redraw = (holds_query | _repeats(candidate)) & ~is_target[todo]
        candidate[redraw] = sample_blocks(rng, int(redraw.sum()))
        blocks[todo] = candidate
        todo = todo[redraw.any(axis=1)]

    letters = _LETTER_CODES[blocks]  # (count, B, L)
    separators = np.full((count, NUM_BLOCKS, 1), ord(BLOCK_SEPARATOR), dtype=np.uint8)
    joined = np.concatenate([letters, separators], axis=2).reshape(count, -1)[:, :BLOCKS_LENGTH]
    return np.concatenate(
        [
            joined,
            np.full((count, 1), ord(QUERY_SEPARATOR), dtype=np.uint8),
            _LETTER_CODES[query],
            letters[rows, target],
        ],
        axis=1,
    )


def to_text(example: np.ndarray) -> str:
    """One example row as its string."""
    return example.tobytes().decode("ascii")
