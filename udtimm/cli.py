"""The scripts' command line: run a script's main, and end it with one `error:` line when the user's input is at
fault. Imports no training stack (accelerate, the trainer), so predict.py and the exporters start quickly."""

from __future__ import annotations

import sys
import traceback
from collections.abc import Callable

from udtimm.errors import USER_ERRORS


def run_script(main: Callable[[], object], debug: Callable[[], bool] | None = None) -> None:
    """Run a script's main; errors caused by the user's input end it with one `error:` line. `debug`, for the
    scripts with --debug: reads it from the parsed flags (command line or -c YAML); true adds the traceback."""
    try:
        main()
    except USER_ERRORS as err:
        if debug is not None and debug_requested(debug):
            traceback.print_exception(err)
        sys.exit(f"error: {user_message(err)}")


def debug_requested(debug: Callable[[], bool]) -> bool:
    """--debug as parsed, a -c YAML's `debug: true` included. The flags are parsed again only on this error path,
    so that main(argv) stays each script's one entry point; flags that do not parse show no traceback."""
    try:
        return debug()
    except USER_ERRORS:
        return False


def user_message(err: BaseException) -> str:
    """The error's own message; an error raised in a loader worker reaches the main process with the worker's
    traceback around it (torch's ExceptionWrapper), of which only the last line is the message."""
    message = str(err)
    if "\nOriginal Traceback" not in message:
        return message
    last = message.rstrip().splitlines()[-1]  # "package.module.ErrorClass: the message"
    name = f"{type(err).__name__}: "
    return last[last.index(name) + len(name):] if name in last else last
