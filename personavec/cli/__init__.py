"""The `personavec` command: a thin layer over the library.

Answers and JSON go to stdout; logs, progress and errors go to stderr. Every
user error is one line (`error: ...`) and exit code 2.
"""

from __future__ import annotations

import sys
import warnings

import typer

from ..errors import PersonavecError
from . import extract, judge, models, serve, train, traits, uses, vectors
from .common import log

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Persona vectors: find, monitor and steer character traits in chat models.")

# The order here is the order of `personavec --help`.
for _group in (models, vectors, extract, traits, judge, uses, train, serve):
    _group.register(app)


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)
    try:
        app()
    except PersonavecError as exc:
        log(f"error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        log("interrupted")
        sys.exit(130)

