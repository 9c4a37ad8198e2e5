"""Entry-point plumbing shared by every `python -m jaxseg.*` command."""
from __future__ import annotations

import os
import sys
from typing import Callable

# Keep TensorFlow's start-up chatter off the terminal; users see jaxseg's own lines.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

USER_ERRORS = (ValueError, FileNotFoundError, FileExistsError, NotADirectoryError, KeyError,
               FloatingPointError)


def run_main(main: Callable[[list[str]], None]) -> None:
    """Runs an absl main; a bad input becomes one line on stderr and exit status 1.

    The modules raise ValueError/FileNotFoundError with a message that names the file or
    field; a traceback would bury that line, so it is printed alone.
    """
    from absl import app, logging

    def guarded(argv: list[str]) -> None:
        # Orbax and TensorFlow log every checkpoint step at INFO; keep warnings only.
        logging.set_verbosity(logging.WARNING)
        try:
            main(argv)
        except USER_ERRORS as error:
            message = error.args[0] if isinstance(error, KeyError) and error.args else error
            print(f"error: {message}", file=sys.stderr)
            sys.exit(1)

    app.run(guarded)
