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
import itertools
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


class TableReader:
    """The rows of a Parquet file or `datasets` folder by index range, in order, without loading the whole table:
    Parquet by row group (a read that goes on where the last one stopped does not start over), `datasets`
    memory-mapped. `read_chats` reads tables with it, and `--ray` workers their shards."""

    BATCH = 4096

    def __init__(self, path: str | Path, name: str | Path | None = None):
        path = Path(path)
        self.name = name = Path(name or path)  # what `where` and errors say (a worker opens an absolute path)
        self.fmt = chat_format(path)
        if self.fmt == "parquet":
            if not path.exists():
                raise PersonavecError(f"{name}: no such file")
            if path.is_dir():
                raise PersonavecError(f"{name}: is a folder, not a file")
            pq = need("pyarrow.parquet", f"{name}: reading Parquet")
            try:
                self._file = pq.ParquetFile(path)
                self.schema = self._file.schema_arrow.remove_metadata()
            except Exception as exc:  # pyarrow raises ArrowInvalid / OSError with a long text
                raise self._unreadable(exc) from None
            sizes = [self._file.metadata.row_group(g).num_rows for g in range(self._file.num_row_groups)]
            self.group_starts = [0, *itertools.accumulate(sizes)][:len(sizes)]
            self.num_rows = sum(sizes)
            self._pos, self._batches, self._held = 0, None, None
            return
        self._ds = _open_hf(path, name).with_format("arrow")
        self.num_rows = len(self._ds)
        self.schema = self._ds[0:0].schema.remove_metadata()  # datasets' stored features would no longer match

    def _unreadable(self, exc: BaseException) -> PersonavecError:
        return PersonavecError(f"{self.name}: not a readable Parquet file ({str(exc).splitlines()[0]})")

    def tables(self, start: int, stop: int) -> Iterator:
        """Rows [start, stop) as Arrow tables or record batches, in order."""
        stop = min(stop, self.num_rows)
        if start >= stop:
            return
        if self.fmt == "hf":
            yield self._ds[start:stop]
            return
        import bisect

        group = bisect.bisect_right(self.group_starts, start) - 1
        if self._batches is None or start < self._pos or self.group_starts[group] > self._pos:
            # behind the last read, or a whole row group ahead of it: start again at start's row group
            self._batches = self._file.iter_batches(batch_size=self.BATCH, use_threads=False,
                                                    row_groups=range(group, len(self.group_starts)))
            self._pos, self._held = self.group_starts[group], None
        while self._pos < stop:
            if self._held is None:
                try:
                    self._held = next(self._batches)
                except StopIteration:
                    raise PersonavecError(f"{self.name}: has fewer rows than its metadata says") from None
                except Exception as exc:
                    raise self._unreadable(exc) from None
            batch, first = self._held, self._pos
            last = first + batch.num_rows
            lo, hi = max(start, first) - first, min(stop, last) - first
            # the rest of the batch is kept for the next read, which usually starts where this one stops
            self._held, self._pos = (batch.slice(hi), first + hi) if hi < batch.num_rows else (None, last)
            if hi > lo:
                yield batch.slice(lo, hi - lo)

    def rows(self, start: int, stop: int) -> Iterator[tuple[str, dict]]:
        """`(where, row)` of rows [start, stop), `where` = `file:row i` (0-based)."""
        index = start
        for table in self.tables(start, stop):
            yield from table_rows(self.name, table, index)
            index += table.num_rows


def table_rows(path, table, first: int) -> Iterator[tuple[str, dict]]:
    """`(where, row)` of an Arrow table or batch of a chat file whose first row is row `first` of `path`."""
    for i, row in enumerate(table.to_pylist(), start=first):
        yield f"{path}:row {i}", _strip_message_nulls(row)


def _open_hf(path: Path, name: Path | None = None):
    """A `datasets` folder, memory-mapped; one-line errors (naming `name`) for what is not one."""
    name = name or path
    if (path / "dataset_dict.json").is_file():
        splits = json.loads((path / "dataset_dict.json").read_text()).get("splits", [])
        raise PersonavecError(f"{name}: is a DatasetDict with splits {', '.join(splits)}; give one split's folder "
                              f"(e.g. {name / (splits[0] if splits else 'train')})")
    if not path.exists():
        raise PersonavecError(f"{name}: no such datasets folder")
    if not is_hf_folder(path):
        raise PersonavecError(f"{name}: not a datasets folder (no {' / '.join(HF_MARKERS)}); save one with "
                              "Dataset.save_to_disk")
    datasets = need("datasets", f"{name}: reading a datasets folder")
    try:
        return datasets.load_from_disk(str(path))
    except Exception as exc:
        raise PersonavecError(f"{name}: not a readable datasets folder ({str(exc).splitlines()[0]})") from None


def iter_rows(path: str | Path, table_info: ChatTable | None = None) -> Iterator[tuple[str, dict]]:
    """`(where, row)` of a Parquet file or `datasets` folder, `where` = `file:row i` (0-based)."""
    reader = TableReader(path)
    if table_info is not None:
        table_info.schema = reader.schema
    yield from reader.rows(0, reader.num_rows)


def jsonl_lines(path: str | Path, start: int, end: int) -> Iterator[tuple[int, bytes]]:
    """`(offset, raw line)` of each line of a file that starts in the byte range [start, end). A line that began
    before `start` belongs to the range before: that is how a file is cut into byte ranges read in parallel."""
    with open(path, "rb") as f:
        if start > 0:
            f.seek(start - 1)
            if f.read(1) != b"\n":
                f.readline()  # the rest of a line that began before start
        pos = f.tell()
        while pos < end:
            raw = f.readline()
            if not raw:
                break
            yield pos, raw
            pos += len(raw)


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


def union_keys(rows: Iterable[dict], skip=()) -> list[str]:
    """Every key of any row, in the order first seen (missing values become nulls), less `skip`."""
    keys, skip = dict.fromkeys(k for row in rows for k in row), set(skip)
    return [k for k in keys if k not in skip]


def arrow_table(rows: list[dict], schema=None):
    """Rows as a pyarrow Table: the input's columns with their types (`schema`), then the added columns, inferred."""
    pa = need("pyarrow", "writing Parquet")
    if not rows:
        return pa.Table.from_pylist(rows, schema=schema)
    if schema is None:  # pyarrow takes the first row's keys only; a key first seen later must not be dropped
        keys = union_keys(rows)
        return pa.Table.from_pylist([{k: r.get(k) for k in keys} for r in rows])
    added = union_keys(rows, skip=schema.names)
    table = pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in rows], schema=schema)
    if added:
        extra = pa.Table.from_pylist([{k: r.get(k) for k in added} for r in rows])
        for name in added:
            table = table.append_column(name, extra[name])
    return table


CHUNK_ROWS = 8192  # rows turned into Arrow at a time when the column types are known


def write_chats(path: str | Path, rows: Iterable[dict], like: list | None = None) -> Path:
    """Write chat rows atomically in the format `path` names; `like` (the input `ChatTable`) gives column types.

    JSONL is written line by line. Parquet and `datasets` outputs with known input column types are converted
    `CHUNK_ROWS` rows at a time through a temp Arrow file, so no list of every row is built (a `--ray` job streams
    its output); without them every row is needed at once, to infer the types as pyarrow does."""
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
    pa = need("pyarrow", f"{path}: writing Parquet" if fmt == "parquet" else f"{path}: writing a datasets folder")
    if schema is None:
        return _write_table(path, fmt, arrow_table(list(rows), None))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        base, extra_rows, n_rows = tmp / "base.arrow", [], 0
        with pa.OSFile(str(base), "wb") as sink, pa.ipc.new_stream(sink, schema) as writer:
            it = iter(rows)
            names = set(schema.names)
            while chunk := list(itertools.islice(it, CHUNK_ROWS)):
                writer.write_table(pa.Table.from_pylist([{k: r.get(k) for k in schema.names} for r in chunk],
                                                        schema=schema))
                extra_rows += [{k: v for k, v in r.items() if k not in names} for r in chunk]
                n_rows += len(chunk)
        if not n_rows:
            return _write_table(path, fmt, pa.Table.from_pylist([], schema=schema))
        # the added columns (any row's) with their types from all their values at once, as `arrow_table` infers them
        added = union_keys(extra_rows)
        extra = pa.Table.from_pylist([{k: r.get(k) for k in added} for r in extra_rows]) if added else None
        out_schema = schema
        for name in added:
            out_schema = out_schema.append(pa.field(name, extra.schema.field(name).type))

        def tables():
            offset = 0
            with pa.memory_map(str(base)) as source:
                for batch in pa.ipc.open_stream(source):
                    table = pa.Table.from_batches([batch])
                    for name in added:
                        table = table.append_column(name, extra[name].slice(offset, batch.num_rows))
                    offset += batch.num_rows
                    yield table

        if fmt == "parquet":
            pq = need("pyarrow.parquet", f"{path}: writing Parquet")

            def write(tmp_file: Path) -> None:
                with pq.ParquetWriter(tmp_file, out_schema) as w:
                    for table in tables():
                        w.write_table(table)

            return atomic_write(path, write)
        full = tmp / "full.arrow"  # one Arrow stream file, which datasets memory-maps and saves from
        with pa.OSFile(str(full), "wb") as sink, pa.ipc.new_stream(sink, out_schema) as writer:
            for table in tables():
                writer.write_table(table)
        return _write_hf(path, full)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _write_table(path: Path, fmt: str, table) -> Path:
    from .atomic import atomic_write

    if fmt == "parquet":
        pq = need("pyarrow.parquet", f"{path}: writing Parquet")
        return atomic_write(path, lambda tmp: pq.write_table(table, tmp))
    return _write_hf(path, table)


def _write_hf(path: Path, table) -> Path:
    """`Dataset.save_to_disk` of an Arrow table (or an Arrow stream file, memory-mapped) into a temp folder beside
    `path`, then swapped in (an old datasets folder there is replaced; anything else is refused)."""
    datasets = need("datasets", f"{path}: writing a datasets folder")
    from datasets.table import InMemoryTable

    if path.exists() and not is_hf_folder(path):
        raise PersonavecError(f"{path}: exists and is not a datasets folder; give a new path")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    old = None
    try:
        datasets.disable_progress_bars()
        ds = datasets.Dataset.from_file(str(table)) if isinstance(table, Path) else \
            datasets.Dataset(InMemoryTable(table))
        ds.save_to_disk(str(tmp / "ds"))
        if path.exists():
            old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
            os.replace(path, old / "ds")
        os.replace(tmp / "ds", path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    return path
