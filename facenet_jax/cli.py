"""What every command line shares: its logging, and the one way it reports a user error.

A user error (a bad flag or config key, a missing file or folder, an output that would be
overwritten, a corrupt data file) is printed as one line on stderr,

    error (FileNotFoundError): weight file /x.pt does not exist [FACENET_JAX_TRACEBACK=1 ...]

and the process exits with status 2, before any compile or long work where the check allows.
Anything else (a bug, a non-finite loss) keeps its traceback. Every `python -m facenet_jax.X`
starts through `run(main)` (absl flags) or wraps its `main` in `one_line_user_errors`
(argparse: the sweep), so the rule lives here only.
"""

from __future__ import annotations

import functools
import logging
import os
import pathlib
import pickle
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

# Errors the command lines report as one line; a corrupt pickle (a `.bin` set, a weight file)
# is untrusted input, not a bug. Anything else keeps its traceback.
USER_ERRORS = (ValueError, KeyError, OSError, pickle.UnpicklingError)
TRACEBACK_ENV = "FACENET_JAX_TRACEBACK"  # set to 1: user errors show their traceback too
EXIT_USER_ERROR = 2


def cli_logging() -> None:
    """The command lines' logging: this package's INFO lines, orbax's warnings only.

    orbax logs each save or restore in ~20 INFO lines through absl's logger, which would bury
    the progress lines (this package logs through the root logger).
    """
    logging.getLogger().setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)


def tracebacks_wanted() -> bool:
    """Whether FACENET_JAX_TRACEBACK asks for user errors' tracebacks."""
    return os.environ.get(TRACEBACK_ENV, "") not in ("", "0")


def error_line(error: BaseException, message: str | None = None) -> str:
    """`error (Type): message [hint]`, what `exit_with_user_error` prints."""
    if message is None:
        message = (error.args[0] if isinstance(error, KeyError) and error.args
                   else str(error))
    return f"error ({type(error).__name__}): {message} [{TRACEBACK_ENV}=1 shows the traceback]"


def exit_with_user_error(error: BaseException, message: str | None = None) -> NoReturn:
    """Prints `error_line(error, message)` on stderr and exits with status 2."""
    print(error_line(error, message), file=sys.stderr, flush=True)
    sys.exit(EXIT_USER_ERROR)


def one_line_user_errors(main: Callable[..., Any]) -> Callable[..., Any]:
    """Wraps a CLI's main: a USER_ERRORS exception prints one line on stderr and exits with
    status 2, without a traceback (unless FACENET_JAX_TRACEBACK=1)."""
    @functools.wraps(main)
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        try:
            return main(*args, **kwargs)
        except USER_ERRORS as error:
            if tracebacks_wanted():
                raise
            exit_with_user_error(error)
    return wrapped


def parse_flags(argv: Sequence[str]) -> list[str]:
    """absl's flag parsing with user errors reported by `exit_with_user_error`: a bad flag
    value, an unknown flag, a missing required flag, a config override naming an unknown key
    (ml_collections' "did you mean" kept) or a config file that does not exist. Returns the
    arguments left for main, as absl's own parser does."""
    from absl import flags

    argv = list(argv)
    try:
        left = flags.FLAGS(argv)
    except (flags.Error, AttributeError, KeyError, OSError) as error:
        if tracebacks_wanted():
            raise
        _exit_if_config_file_missing(argv)
        exit_with_user_error(error, flag_error_text(error, argv))
    _exit_if_config_file_missing(argv)
    return left


def run(main: Callable[[list[str]], Any],
        rewrite_argv: Callable[[list[str]], list[str]] | None = None) -> None:
    """`absl.app.run(main)` for this package's CLIs: flags parsed by `parse_flags` (after
    `rewrite_argv`, for a CLI that spells some flags its own way), main's user errors reported
    by `one_line_user_errors`."""
    from absl import app

    app.run(one_line_user_errors(main),
            flags_parser=lambda argv: parse_flags(rewrite_argv(argv) if rewrite_argv else argv))


def _innermost_text(error: BaseException) -> str:
    """ml_collections wraps a KeyError in an AttributeError: the KeyError's own text."""
    while error.args and isinstance(error.args[0], BaseException):
        error = error.args[0]
    return str(error.args[0]) if isinstance(error, KeyError) and error.args else str(error)


def flag_error_text(error: BaseException, argv: Sequence[str]) -> str:
    """One line for a flag parsing error of `argv`; an unknown config key names the override it
    is in (`--config.loss.stratgy: unknown config key 'stratgy'; Did you mean ...`). A config
    file that raised keeps its own traceback (ml_collections puts it in the message): that
    traceback is the config file's, the only place its error shows."""
    text = _innermost_text(error)
    if "Traceback (most recent call last)" in text:
        return text
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if isinstance(error, (AttributeError, KeyError)) and lines:
        key = lines[0].strip("'\"")
        overrides = [arg.lstrip("-").split("=", 1)[0] for arg in argv
                     if re.match(r"^--?\w+\.", arg)]
        named = [flag for flag in overrides if key in flag.split(".")[1:]]
        where = f"--{named[0]}: " if len(named) == 1 else ""
        return "; ".join([f"{where}unknown config key {key!r}", *lines[1:]])
    return " ".join(lines)


def _exit_if_config_file_missing(argv: Sequence[str]) -> None:
    """A user error "--config PATH: config file not found" when a config flag names no file
    (ml_collections defers that error to the first use of the config, in several lines)."""
    from absl import flags
    from ml_collections import config_flags

    for name in flags.FLAGS:
        given = _given(name, argv)
        if given and isinstance(flags.FLAGS[name].parser,
                                config_flags.config_flags.ConfigFileFlagParser):
            path = given.split(":", 1)[0]  # FILE:ARGUMENT passes ARGUMENT to get_config
            if not pathlib.Path(path).is_file():
                exit_with_user_error(FileNotFoundError(f"--{name} {path}: config file not "
                                                       "found"))


def _given(name: str, argv: Sequence[str]) -> str | None:
    """The value given to --NAME in argv (`--NAME=V` or `--NAME V`), or None."""
    for i, arg in enumerate(argv):
        if arg in (f"--{name}", f"-{name}") and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith((f"--{name}=", f"-{name}=")):
            return arg.split("=", 1)[1]
    return None
