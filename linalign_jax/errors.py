"""One exception type for bad input, so binaries can print it as one line and exit non-zero."""


class LinalignError(ValueError):
    """Bad input or a broken artefact; the message names the problem and what was expected."""
