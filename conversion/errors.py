"""The one error type of the converters: bad input or options, reported before anything is written."""


class ConversionError(ValueError):
    """A checkpoint, an output folder or an option that a conversion cannot use; the message says why."""
