"""Chat files in three formats: JSON Lines, Parquet, and a Hugging Face `datasets` folder (`save_to_disk`).

The one place that knows how a chat file is stored. `chat_format(path)` picks the format:

- a folder holding `dataset_info.json` + `state.json` (what `Dataset.save_to_disk` writes), or a path whose name
  ends in `.hf`: a `datasets` folder;
- a name ending in `.parquet`: Parquet;
- anything else: JSON Lines (what personavec has always read and written).

Every format holds the same rows: a `messages` column in the chat schema (a list of `{"role", "content"}` structs)
and any other columns, which are kept and written back. A bad row gets the same one-line error as a bad JSONL line,
naming the row by its 0-based index (`data.parquet:row 7: missing "messages"`), the index `ds[7]` and pandas use.

Parquet and `datasets` need optional packages (`pip install 'personavec[ray]'`, `'personavec[datasets]'`); without
them the error says which. Output keeps the input's column types when the input was Parquet or `datasets`, and adds
the new columns (e.g. the `persona` struct) after them.
"""

from __future__ import annotations

import base64
import datetime
import decimal
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable, Iterator

from .errors import PersonavecError

FORMATS = ("jsonl", "parquet", "hf")
HF_MARKERS = ("dataset_info.json", "state.json")
EXTRAS = {"pyarrow": "ray", "pandas": "ray", "ray": "ray", "datasets": "datasets"}


def need(module: str, why: str):
    """Import an optional dependency, or a one-line error naming the extra that brings it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        extra = EXTRAS.get(module.split(".")[0], "ray")
        raise PersonavecError(f"{why} needs {module.split('.')[0]}, which is not installed: "
                              f"pip install 'personavec[{extra}]'") from None


def is_hf_folder(path: Path) -> bool:
    return path.is_dir() and all((path / m).is_file() for m in HF_MARKERS)


def chat_format(path: str | Path) -> str:
    """`jsonl`, `parquet` or `hf` for an input or output path (see the module docstring)."""
    path = Path(path)
    if is_hf_folder(path) or path.suffix.lower() == ".hf" or (path / "dataset_dict.json").is_file():
        return "hf"
    if path.suffix.lower() == ".parquet":
        return "parquet"
    return "jsonl"


def kept_path(output: str | Path) -> Path:
    """Where `screen --drop-top/--keep-below` writes the kept original rows: `O.kept.jsonl` beside `O.jsonl`,
    `O.kept.parquet` beside `O.parquet`, `O.kept.hf` beside a `datasets` folder `O.hf` (or `O` + `.kept.hf`)."""
    output = Path(output)
    fmt = chat_format(output)
    suffix = {"jsonl": ".kept.jsonl", "parquet": ".kept.parquet", "hf": ".kept.hf"}[fmt]
    stem = output.stem if (fmt != "hf" or output.suffix.lower() == ".hf") else output.name
    return output.with_name(stem + suffix)


def check_output(path: Path, flag: str) -> Path:
    """Refuse an output the format cannot write, before any work: a folder that is not a `datasets` folder, or a
    format whose package is missing."""
    fmt = chat_format(path)
    if path.is_dir() and not is_hf_folder(path):
        raise PersonavecError(f"{flag} {path}: is a folder; give a file path (or a datasets folder, NAME.hf)")
    if fmt == "parquet":
        need("pyarrow", f"{flag} {path}: writing Parquet")
    elif fmt == "hf":
        need("datasets", f"{flag} {path}: writing a datasets folder")
    return path


# -- reading -------------------------------------------------------------------------------------------------

class ChatTable(list):
    """The rows of a chat file (a list of `ChatRecord`), with the Arrow schema of a Parquet or `datasets` input so
    that outputs keep its column types (None for JSONL)."""

    schema = None
    format = "jsonl"


def _strip_message_nulls(obj: dict) -> dict:
    """Arrow stores a list of messages as structs with the union of their keys, so a key that only some messages
    have (`name`, `weight`) reads back as None on the others; drop those, as the JSONL line never had them."""
    messages = obj.get("messages")
    if isinstance(messages, list):
        obj["messages"] = [{k: v for k, v in m.items() if v is not None or k in ("role", "content")}
                           if isinstance(m, dict) else m for m in messages]
    return obj


def read_table(path: Path):
    """`(pyarrow.Table, fmt)` of a Parquet file or `datasets` folder; one-line errors for unreadable ones."""
    fmt = chat_format(path)
    if fmt == "parquet":
        if not path.exists():
            raise PersonavecError(f"{path}: no such file")
        if path.is_dir():
            raise PersonavecError(f"{path}: is a folder, not a file")
        pq = need("pyarrow.parquet", f"{path}: reading Parquet")
        try:
            return pq.read_table(path), fmt
        except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with a long text
            raise PersonavecError(f"{path}: not a readable Parquet file ({str(exc).splitlines()[0]})") from None
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise PersonavecError(f"{path}: is a DatasetDict with splits {', '.join(splits)}; give one split's folder "
                              f"(e.g. {path / (splits[0] if splits else 'train')})")
    if not path.exists():
        raise PersonavecError(f"{path}: no such datasets folder")
    if not is_hf_folder(path):
        raise PersonavecError(f"{path}: not a datasets folder (no {' / '.join(HF_MARKERS)}); save one with "
                              "Dataset.save_to_disk")
    datasets = need("datasets", f"{path}: reading a datasets folder")
    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as exc:
        raise PersonavecError(f"{path}: not a readable datasets folder ({str(exc).splitlines()[0]})") from None
    return ds.with_format("arrow")[:], fmt


def iter_rows(path: str | Path, table_info: ChatTable | None = None) -> Iterator[tuple[str, dict]]:
    """`(where, row)` of a Parquet file or `datasets` folder, `where` = `file:row i` (0-based)."""
    path = Path(path)
    table, _ = read_table(path)
    if table_info is not None:
        table_info.schema = table.schema.remove_metadata()  # datasets' stored features would no longer match
    index = 0
    for batch in table.to_batches(max_chunksize=4096):
        for row in batch.to_pylist():
            yield f"{path}:row {index}", _strip_message_nulls(row)
            index += 1


# -- writing -------------------------------------------------------------------------------------------------

def _json_default(value):
    """Parquet values that JSON has no type for: dates as ISO text, decimals as numbers, bytes as base64."""
    if isinstance(value, (datetime.datetime, datetime.date, datetime.time)):
        return value.isoformat()
    if isinstance(value, datetime.timedelta):
        return value.total_seconds()
    if isinstance(value, decimal.Decimal):
        return float(value)
    if isinstance(value, bytes):
        return base64.b64encode(value).decode("ascii")
    raise TypeError(f"{type(value).__name__} is not JSON serializable")


def arrow_table(rows: list[dict], schema=None):
    """Rows as a pyarrow Table: the input's columns with their types (`schema`), then the added columns, inferred."""
    pa = need("pyarrow", "writing Parquet")
    if schema is None or not rows:
        return pa.Table.from_pylist(rows, schema=schema)
    added = [k for k in rows[0] if k not in schema.names]
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    if added:
        extra = pa.Table.from_pylist([{k: r.get(k) for k in added} for r in rows])
        for name in added:
            table = table.append_column(name, extra[name])
    return table


def write_chats(path: str | Path, rows: Iterable[dict], like: list | None = None) -> Path:
    """Write chat rows atomically in the format `path` names; `like` (the input `ChatTable`) gives column types."""
    from .atomic import atomic_write

    path = Path(path)
    fmt = chat_format(path)
    schema = getattr(like, "schema", None)
    if fmt == "jsonl":  # exactly chat.write_jsonl's lines; `default` only matters for rows read from Parquet

        def write(tmp: Path) -> None:
            with open(tmp, "w", encoding="utf-8") as f:
                for row in rows:
                    f.write(json.dumps(row, ensure_ascii=False, default=_json_default) + "\n")

        return atomic_write(path, write)
    table = arrow_table(list(rows), schema)
    if fmt == "parquet":
        pq = need("pyarrow.parquet", f"{path}: writing Parquet")
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return _write_hf(path, table)


def _write_hf(path: Path, table) -> Path:
    """`Dataset.save_to_disk` into a temp folder beside `path`, then swapped in (an old datasets folder there is
    replaced; anything else is refused)."""
    datasets = need("datasets", f"{path}: writing a datasets folder")
    from datasets.table import InMemoryTable

    if path.exists() and not is_hf_folder(path):
        raise PersonavecError(f"{path}: exists and is not a datasets folder; give a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    old = None
    try:
        datasets.disable_progress_bars()
        datasets.Dataset(InMemoryTable(table)).save_to_disk(str(tmp / "ds"))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "ds")
        os.replace(tmp / "ds", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
