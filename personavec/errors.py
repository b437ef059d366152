"""The one exception type that the CLI turns into a one-line error, and how its messages name parameters.

Library errors name the parameter at fault as Python code would write it (`layer=99`); the same error raised while
the `personavec` command runs names the flag (`--layer 99`). Messages get the right spelling from `arg()`.
"""

from __future__ import annotations

import contextvars
from contextlib import contextmanager


class PersonavecError(Exception):
    """A user-facing error: the message is one line that names the file, line or flag at fault."""


_STYLE = contextvars.ContextVar("personavec_error_style", default="library")
_NO_VALUE = object()


def arg(name: str, value=_NO_VALUE, flag: str | None = None) -> str:
    """A parameter as an error message names it: `name=value` in the library, `--flag value` under the CLI.

    `flag` is the CLI spelling when it is not `--name` with dashes (e.g. `candidate_layers` is `--layers`).
    Without a value it is `name=` or `--flag` (for "pass layer=" / "pass --layer").
    """
    if _STYLE.get() == "cli":
        text = flag or "--" + name.replace("_", "-")
        return text if value is _NO_VALUE else f"{text} {value}"
    return f"{name}=" if value is _NO_VALUE else f"{name}={value}"


@contextmanager
def cli_style():
    """While the `personavec` command runs, error messages name flags instead of parameters."""
    token = _STYLE.set("cli")
    try:
        yield
    finally:
        _STYLE.reset(token)


def current_style() -> str:
    """`"cli"` or `"library"`: what a worker process (Ray) must use to word its errors as the command here would."""
    return _STYLE.get()


@contextmanager
def error_style(style: str):
    """Word errors in `style` (see `current_style`) for the duration."""
    token = _STYLE.set(style)
    try:
        yield
    finally:
        _STYLE.reset(token)
