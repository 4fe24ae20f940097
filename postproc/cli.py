"""Command-line plumbing shared by the postproc commands: bad input is one line and exit code 2."""

from __future__ import annotations

import sys
from collections.abc import Callable

from postproc.csvio import CsvError
from postproc.predio import PredError


def exit_on_error(main: Callable[[], int]) -> int:
    """Run ``main``; turn expected failures (bad paths, malformed files) into one line on stderr.

    Unexpected exceptions keep their traceback: they are bugs, not bad input.
    """
    try:
        return main()
    except (PredError, CsvError, ValueError, FileNotFoundError, PermissionError,
            IsADirectoryError, NotADirectoryError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
