"""One exception type for bad input, so binaries can print it as one line and exit non-zero."""
import contextlib
import sys
from typing import Iterator


class LinalignError(ValueError):
    """Bad input or a broken artefact; the message names the problem and what was expected."""


@contextlib.contextmanager
def exit_on_bad_input(code: int = 2) -> Iterator[None]:
    """For binaries: a LinalignError becomes one `error: ...` line on stderr and exit status `code`."""
    try:
        yield
    except LinalignError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(code)
