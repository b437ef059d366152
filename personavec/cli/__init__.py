"""The `personavec` command: a thin layer over the library.

Answers and JSON go to stdout; logs, progress and errors go to stderr. Every
user error is one line (`error: ...`) and exit code 2: errors of the library,
bad flag values and usage errors (a missing or unknown option) alike. Warnings
are one `warning: ...` line each.
"""

from __future__ import annotations

import sys
import warnings
from contextlib import contextmanager

import typer
import typer.core

from ..errors import PersonavecError, cli_style
from . import extract, judge, models, profile, serve, train, traits, uses, vectors
from .common import log

try:  # typer >= 0.20 ships its own copy of click; its exceptions are the ones raised
    from typer._click import exceptions as click_exceptions
except ImportError:  # pragma: no cover - older typer on the click package
    from click import exceptions as click_exceptions

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Persona vectors: find, monitor and steer character traits in chat models.")

# The order here is the order of `personavec --help`.
for _group in (models, vectors, extract, traits, judge, uses, profile, train, serve):
    _group.register(app)


def _no_placeholder_on_flags() -> None:
    """typer's help shows a `<bool>` type after options that take no value (`--force`, `--help`): show nothing."""
    option = typer.core.TyperOption
    if getattr(option.display_type_rich, "_personavec", False):
        return
    original = option.display_type_rich

    def display_type_rich(self, ctx):
        return None if self.is_flag and self.metavar is None else original(self, ctx)

    display_type_rich._personavec = True
    option.display_type_rich = display_type_rich


_no_placeholder_on_flags()


@contextmanager
def _warnings_as_lines():
    """Python warnings (from personavec or a library under it) as one `warning: ...` line, without the source line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)

        def show(message, category, filename, lineno, file=None, line=None):
            log("warning: " + " ".join(str(message).split()))

        warnings.showwarning = show
        yield


def _one_line(text: str) -> str:
    return " ".join(text.split())


def main() -> None:
    with cli_style(), _warnings_as_lines():
        try:
            code = app(standalone_mode=False)
        except PersonavecError as exc:
            log(f"error: {_one_line(str(exc))}")
            sys.exit(2)
        except click_exceptions.NoArgsIsHelpError as exc:
            # `personavec` or `personavec models` alone: the help. typer's rich help prints itself while the
            # exception is made (its message is then empty); plain click puts it in the message.
            if exc.format_message().strip():
                print(exc.format_message())
            sys.exit(2)
        except click_exceptions.UsageError as exc:  # missing or unknown option, a value of the wrong type
            hint = f" (see `{exc.ctx.command_path} --help`)" if exc.ctx is not None else ""
            log(f"error: {_one_line(exc.format_message())}{hint}")
            sys.exit(2)
        except typer.Abort:
            log("aborted")
            sys.exit(1)
        except KeyboardInterrupt:
            log("interrupted")
            sys.exit(130)
    if code == 130:
        log("interrupted")
    if isinstance(code, int) and code:
        sys.exit(code)
