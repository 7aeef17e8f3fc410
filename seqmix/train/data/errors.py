"""The error every data-loading failure raises: its message names the file (and line) at fault."""


class DataError(ValueError):
    """A corpus, file or tokenizer that cannot be used as training data."""
