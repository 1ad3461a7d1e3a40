"""The one error type of fine-tuning: bad data, model folders or options, reported before training starts."""


class FinetuneError(ValueError):
    """A data file, model folder, tokenizer or option that fine-tuning cannot use; the message says why."""
