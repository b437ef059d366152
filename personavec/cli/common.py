"""Helpers shared by the command groups: stderr logging, the checks every flag and output path gets before any
work, the console tables print to, and the one place a command loads a model for an engine.

Numeric flags are checked while the command line is parsed, by the callbacks below (`typer.Option(16,
"--batch-size", callback=positive_int)`); a bad value is the one-line `error: --flag VALUE: ...` (exit 2).
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import PersonavecError


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- flag values, checked at parse time -----------------------------------------------------------------------

def _flag(param: typer.CallbackParam) -> str:
    longs = [o for o in param.opts if o.startswith("--")]
    return longs[0] if longs else param.opts[0]


def _check(param: typer.CallbackParam, value, ok: bool, need: str):
    if not ok:
        raise PersonavecError(f"{_flag(param)} {value}: {need}")
    return value


def positive_int(param: typer.CallbackParam, value: Optional[int]) -> Optional[int]:
    """Counts: batch sizes, token budgets, numbers of questions (None: the flag's own default)."""
    return value if value is None else _check(param, value, value >= 1, "must be at least 1")


def non_negative_int(param: typer.CallbackParam, value: Optional[int]) -> Optional[int]:
    """Layer numbers and counts where 0 means none (e.g. `--top-k 0` lists nothing)."""
    return value if value is None else _check(param, value, value >= 0, "must be 0 or more")


def finite_float(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
    """Coefficients and thresholds: any real number, not nan or inf."""
    return value if value is None else _check(param, value, math.isfinite(value), "must be a finite number")


def non_negative_float(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
    """Temperatures (0 = greedy), limits and rates that cannot be negative."""
    return value if value is None else _check(param, value, math.isfinite(value) and value >= 0,
                                              "must be a finite number >= 0")


def positive_float(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
    """Learning rates and the like: finite and above 0."""
    return value if value is None else _check(param, value, math.isfinite(value) and value > 0,
                                              "must be a finite number > 0")


def fraction(param: typer.CallbackParam, value: Optional[float]) -> Optional[float]:
    """A share in [0, 1), e.g. `--drop-top 0.1` (the top 10%), or a dropout probability."""
    return value if value is None else _check(param, value, math.isfinite(value) and 0 <= value < 1,
                                              "must be a fraction in [0, 1), e.g. 0.1")


def number_list(text: str, flag: str) -> list[float]:
    """`-1,0,1` as finite floats; anything else is an error naming the flag."""
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"{flag} {text!r}: give comma-separated numbers, e.g. -1,0,1") from None
    if not values:
        raise PersonavecError(f"{flag} {text!r}: give at least one number")
    bad = [x for x in values if not math.isfinite(x)]
    if bad:
        raise PersonavecError(f"{flag} {text!r}: {bad[0]} is not a finite number")
    return values


def int_list(text: str, flag: str) -> list[int]:
    """`8,10,12` as ints; anything else (1.5, x) is an error naming the flag."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"{flag} {text!r}: give comma-separated whole numbers, e.g. 8,10,12") from None
    if not values:
        raise PersonavecError(f"{flag} {text!r}: give at least one number")
    return values


# -- outputs, checked before any work ------------------------------------------------------------------------

def _blocking_parent(path: Path) -> Optional[Path]:
    for parent in path.absolute().parents:
        if parent.exists():
            return None if parent.is_dir() else parent
    return None


def output_file(path: Optional[Path], flag: str) -> Optional[Path]:
    """Refuse an output file path that cannot be written (a folder, or under a file) before anything is computed."""
    if path is None:
        return None
    if path.is_dir():
        raise PersonavecError(f"{flag} {path}: is a folder; give a file path")
    blocker = _blocking_parent(path)
    if blocker is not None:
        raise PersonavecError(f"{flag} {path}: {blocker} is a file, not a folder")
    return path


def chat_output(path: Optional[Path], flag: str) -> Optional[Path]:
    """`output_file` for a chat output: also a `datasets` folder (`NAME.hf`, or one written before), and the package
    its format needs (pyarrow for `.parquet`, datasets for a folder) is checked before any work."""
    from ..datasets_io import check_output, is_hf_folder

    if path is None:
        return None
    if not is_hf_folder(path):
        output_file(path, flag)
    return check_output(path, flag)


def run_folder(path: Optional[Path], flag: str) -> Optional[Path]:
    """Refuse a run folder path that is a file (or lies under one) before anything is computed."""
    if path is None:
        return None
    if path.exists() and not path.is_dir():
        raise PersonavecError(f"{flag} {path}: is a file; a run folder is needed (give a new or existing folder)")
    blocker = _blocking_parent(path)
    if blocker is not None:
        raise PersonavecError(f"{flag} {path}: {blocker} is a file, not a folder")
    return path


# -- tables ----------------------------------------------------------------------------------------------------

def console(stderr: bool = False):
    """The console a command prints a table to. In a terminal: its width. Into a file or a pipe: wide enough that
    no cell is cut or folded, so every name and path stays whole for grep (rich would otherwise assume 80 columns,
    or $COLUMNS)."""
    from rich.console import Console

    plain = Console(stderr=stderr)
    return plain if plain.is_terminal else Console(stderr=stderr, width=10_000)


# -- models ----------------------------------------------------------------------------------------------------

def _engine_mode(value):
    if value is not None:
        from ..backends import ENGINE_MODES, set_engine_options

        if value not in ENGINE_MODES:
            raise typer.BadParameter(f"use {' or '.join(ENGINE_MODES)}")

        set_engine_options(engine_mode=value)
    return value


def _steering_slots(value):
    if value is not None:
        if value < 1:
            raise typer.BadParameter("must be at least 1")
        from ..backends import set_engine_options

        set_engine_options(max_steering_slots=value)
    return value


def engine_mode_option():
    return typer.Option(None, "--engine-mode", callback=_engine_mode,
                        help="vllm: eager (Python hooks) | compiled (steering and readings inside the compiled "
                             "graph); default eager")


def steering_slots_option():
    return typer.Option(None, "--max-steering-slots", callback=_steering_slots,
                        help="vllm compiled: distinct steerings live at once; more requests wait (default 64)")


def load_engine_model(model: str, engine: str, dtype: str = "auto", tensor_parallel_size: int = 1,
                      trust_remote_code: bool = False, **layers):
    """`(backend, tokenizer)` for `--engine`: every command that takes `--engine` loads its model here. The backend
    goes wherever the library takes a model.

    `layers` (`steer_layers`, `read_layers`, `capture_layers`; lists, [] for none): where the command will steer,
    read or capture, when it knows before the model loads. vLLM's compiled mode builds only those ops into the
    graph (each op at each layer costs every step); other engines ignore them."""
    from ..backends import load_backend

    backend = load_backend(model, engine, dtype, tensor_parallel_size, trust_remote_code,
                           **(layers if engine == "vllm" else {}))
    return backend, backend.tokenizer


def command_vector(vector_path: Optional[Path], trait_name: Optional[str], model: str):
    """`(vector, path)` for a command: `--vector FILE`, else the vector shipped for `--model` and `--trait`."""
    from ..vectors import PersonaVector

    if vector_path is not None:
        return PersonaVector.load(vector_path), vector_path
    if not trait_name:
        raise PersonavecError("give --vector FILE, or --trait NAME to use a vector shipped for the model "
                              "(`personavec vectors list`)")
    from ..shipped import load_shipped

    vector = load_shipped(model, trait_name)
    return vector, Path(vector.source)


def vector_layer(vector, model, layer: Optional[int]) -> int:
    """The layer a command steers or reads: the vector's shape is checked against the model first (a vector made
    for another model says so), then `--layer` or the layer the file records."""
    vector.check_model(model)
    return vector.check_layer(layer)


# -- breakdowns (--by) -----------------------------------------------------------------------------------------

# The most groups a printed breakdown lists (the largest); summary.json and report.html have every one.
TABLE_GROUPS = 50


def by_option(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """--by: a field name or dotted path, checked at parse time (empty parts such as `meta.` are refused)."""
    if value is not None and (not value or any(not part for part in value.split("."))):
        raise PersonavecError(f"{_flag(param)} {value!r}: give a field name or a dotted path such as meta.source")
    return value


def print_breakdown(breakdown: dict, title: str) -> None:
    """A breakdown as a table on stderr: group values fold instead of being cut, and into a pipe every cell stays
    whole on its line (see `console`)."""
    from rich.table import Table

    from ..breakdown import breakdown_rows

    shown = dict(breakdown)
    groups = breakdown["groups"]
    if len(groups) > TABLE_GROUPS:
        largest = sorted(sorted(groups, key=lambda g: -g["count"])[:TABLE_GROUPS], key=groups.index)
        shown["groups"] = largest
    headers, rows = breakdown_rows(shown)
    table = Table(title=title)
    for i, header in enumerate(headers):
        table.add_column(header, overflow="fold", justify="left" if i < (2 if "trait" in headers else 1) else "right")
    for row in rows:
        table.add_row(*row)
    console(stderr=True).print(table)
    if len(groups) > TABLE_GROUPS:
        log(f"({TABLE_GROUPS} largest of {len(groups)} groups shown; all of them are in summary.json)")
