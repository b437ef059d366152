"""How `--ray` reads its input: Ray Data read tasks over the file, so the driver never holds the whole file.

Ray Data's own readers do not fit a chat file: `read_json` parses through Arrow (an int becomes a float beside
floats, a key missing from some lines comes back as null on them, a bad line fails with a pandas traceback that
names no line) and no reader numbers the rows. So personavec gives `ray.data.read_datasource` its own read tasks,
built on the readers every command uses (`chat.parse_jsonl_line`, `datasets_io.TableReader`), and a job reads the
file twice, both times in Ray tasks:

1. The check pass (`check_input`). The file is cut into pieces (JSONL: byte ranges of `PIECE_BYTES`, a line
   belonging to the range it starts in; Parquet: row groups; `datasets`: `PIECE_ROWS` rows), one read task each.
   A task parses and checks its rows exactly as `read_chats` and the command's own checks do, and sends back its
   row count (JSONL: each row's byte offset and line), the values the command needs on the driver (labels,
   `--scores`) and the first error of each kind. The driver raises the error the single-process command would have
   raised first, as the same one line, before any model loads; else it cuts the rows into shards.
2. The scoring pass (`shard_dataset`): one dataset row per unfinished shard, `{shard, first, data}` (JSONL: the
   shard's bytes; tables: its rows as an Arrow IPC stream), read by the tasks of a second `read_datasource` and
   decoded by the scoring actors (`decode_shard`).

At the end the driver streams the file once more, shard by shard (`ShardedRecords`), to write the output beside
the scores. It holds the shard offsets and the scores, not the chats.
"""

from __future__ import annotations

import functools
import io
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from ..chat import (ChatRecord, chat_record, check_readable_file, check_response, check_screen_answer, label_value,
                    numeric_field, parse_jsonl_line)
from ..datasets_io import TableReader, chat_format, jsonl_lines, table_rows
from ..errors import PersonavecError, current_style, error_style

PIECE_BYTES = 16 << 20  # JSONL bytes per check task
PIECE_ROWS = 20_000  # table rows per check task (Parquet: at least one row group)
SHARDS_PER_READ = 16  # shards per read task of the scoring pass
MARK = "\0"  # a check task does not know its first line number: its errors say `path:MARK` until the driver does


# -- what a command checks in each row, in the order the single-process command checks it ---------------------------

def _stage(kind: str, arg, record: ChatRecord):
    """One check of a chat: raises the command's one-line error, or returns the value the driver keeps."""
    if kind == "labels":
        return label_value(record, arg)
    if kind == "screen_answer":
        return check_screen_answer(record)
    if kind == "response":
        return check_response(record, arg)
    if kind == "scores":
        return numeric_field(record, arg)
    if kind == "by":
        from ..breakdown import group_keys  # imports torch: only for --by

        return group_keys([record], arg)[0]
    raise ValueError(kind)  # pragma: no cover


KEPT = ("labels", "scores", "by")  # the stages whose values come back to the driver


@dataclass
class ChatInput:
    """A chat file as `--ray` reads it. Before the check pass: its format, identity and, for tables, row count
    and column types; after it: the rows cut into shards, and the values of the `KEPT` stages."""

    path: str  # as the user gave it: what error messages and `where` say
    file: str  # absolute: what the workers open
    fmt: str
    identity: list  # (name, size, mtime_ns) of every file: an edited input is another job
    n: int = 0
    shard_size: int = 256
    spans: list = field(default_factory=list)  # JSONL: (start byte, end byte, line of the first row) per shard
    values: dict = field(default_factory=dict)  # stage kind -> one value per row
    schema: object = None  # tables: the Arrow schema outputs keep

    @classmethod
    def open(cls, path: str | Path) -> "ChatInput":
        """Plan reading `path` without reading its rows; the one-line errors of `read_chats` for a file that is
        missing or not of its format."""
        fmt = chat_format(path)
        schema, n = None, 0
        if fmt == "jsonl":
            check_readable_file(path)
            files = [Path(path)]
        else:
            reader = TableReader(path)  # checks the file and reads the metadata only
            schema, n = reader.schema, reader.num_rows
            files = [Path(path)] if fmt == "parquet" else sorted(p for p in Path(path).iterdir() if p.is_file())
        identity = [(str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
        return cls(path=str(path), file=str(Path(path).resolve()), fmt=fmt, identity=identity, n=n, schema=schema)

    @property
    def where(self) -> dict:
        """What a worker needs to read and name rows (small, sent with every task)."""
        return {"path": self.path, "file": self.file, "fmt": self.fmt}

    @property
    def count(self) -> int:
        return (self.n + self.shard_size - 1) // self.shard_size

    def span(self, shard: int) -> range:
        return range(shard * self.shard_size, min(self.n, (shard + 1) * self.shard_size))

    def check_unchanged(self) -> None:
        now = ChatInput.open(self.path).identity
        if now != self.identity:
            raise PersonavecError(f"{self.path}: changed while the job ran; run the command again")


# -- the check pass -------------------------------------------------------------------------------------------------

def _pieces(inp: ChatInput) -> list[tuple[int, int]]:
    """The check tasks' pieces: JSONL `(start, end)` bytes, tables `(start, stop)` rows."""
    if inp.fmt == "jsonl":
        size = os.path.getsize(inp.file)
        return [(s, min(size, s + PIECE_BYTES)) for s in range(0, size, PIECE_BYTES)]
    if inp.fmt == "hf":
        return [(s, min(inp.n, s + PIECE_ROWS)) for s in range(0, inp.n, PIECE_ROWS)]
    reader = TableReader(inp.file)
    pieces, start = [], 0
    for g, first in enumerate(reader.group_starts + [inp.n]):
        if g and (first - start >= PIECE_ROWS or first == inp.n) and first > start:
            pieces.append((start, first))  # whole row groups: a task never decodes a group another task decodes
            start = first
    return pieces


def _check_piece(where: dict, piece: int, start: int, stop: int, require_response: bool, stages: list,
                 style: str = "library"):
    """One check task: `{piece, lines, offsets, line_of, errors, values}` as a one-row block; errors worded in the
    driver's `style` (flags under the CLI)."""
    with error_style(style):
        yield _check_rows(where, piece, start, stop, require_response, stages)


def _check_rows(where: dict, piece: int, start: int, stop: int, require_response: bool, stages: list):
    import numpy as np
    import pyarrow as pa

    errors: dict[int, tuple[int, str]] = {}  # stage (0: reading) -> (local index, message) of its first error
    offsets, line_of, values = [], [], {k: [] for k, _ in stages if k in KEPT}
    lines = 0

    def check(j: int, obj: dict, where_j: str) -> None:
        try:
            record = chat_record(obj, where_j, require_response)
        except PersonavecError as exc:
            errors.setdefault(0, (j, str(exc)))
            return
        for s, (kind, arg) in enumerate(stages, start=1):
            try:
                value = _stage(kind, arg, record)
            except PersonavecError as exc:
                errors.setdefault(s, (j, str(exc)))
                value = None
            if kind in values:
                values[kind].append(value)

    try:
        if not os.path.exists(where["file"]):  # a worker on another node
            raise PersonavecError(f"{where['path']}: a Ray worker cannot find it at {where['file']}; every node must "
                                  "be able to read the input (shared storage)")
        if where["fmt"] == "jsonl":
            for lines, (offset, raw) in enumerate(jsonl_lines(where["file"], start, stop), start=1):
                number = 1 if offset == 0 else MARK  # line 1 may carry a byte-order mark
                try:
                    obj = parse_jsonl_line(raw, where["path"], number)
                except PersonavecError as exc:
                    errors.setdefault(0, (lines - 1, str(exc)))
                    break
                if obj is None:
                    continue
                offsets.append(offset)
                line_of.append(lines - 1)
                check(lines - 1, obj, f"{where['path']}:{number}")
                if 0 in errors:
                    break  # a later error cannot come first
        else:
            for j, (where_j, row) in enumerate(TableReader(where["file"], where["path"]).rows(start, stop)):
                check(j, row, where_j)
                if 0 in errors:
                    break
    except PersonavecError as exc:  # the file itself (unreadable row group, cut-off file)
        errors.setdefault(0, (0, str(exc)))
    except OSError as exc:
        errors.setdefault(0, (0, f"{where['path']}: cannot read it ({exc.strerror})"))
    return pa.Table.from_pylist([{
        "piece": piece, "lines": lines,
        "offsets": np.asarray(offsets, dtype=np.int64).tobytes(), "line_of": np.asarray(line_of, np.int64).tobytes(),
        "errors": json.dumps({str(k): v for k, v in errors.items()}),
        "values": json.dumps(values)}])


def check_input(ray, inp: ChatInput, shard_size: int, require_response: bool = False,
                stages: list | None = None) -> ChatInput:
    """Read and check every row of `inp` in Ray tasks; raise the first error as `read_chats` and the command would
    have; else return `inp` cut into shards of `shard_size`, with the `KEPT` values of every row."""
    import numpy as np

    stages = list(stages or [])
    pieces = _pieces(inp)
    fns = [functools.partial(_check_piece, inp.where, p, a, b, require_response, stages, current_style())
           for p, (a, b) in enumerate(pieces)]
    rows = sorted(_run(ray, fns, "ChatCheck"), key=lambda r: r["piece"])
    # where each piece's rows start: JSONL counts lines, a table piece knows its first row
    bases = ([0] + list(np.cumsum([r["lines"] for r in rows]))[:-1]) if inp.fmt == "jsonl" else \
        [a for a, _ in pieces]
    found = []  # (stage, position in the file, message)
    for row, base in zip(rows, bases):
        for stage, (j, message) in json.loads(row["errors"]).items():
            if inp.fmt == "jsonl":
                message = message.replace(f"{inp.path}:{MARK}", f"{inp.path}:{base + j + 1}", 1)
            found.append((int(stage), base + j, message))
    if found:
        raise PersonavecError(min(found)[2])
    if inp.fmt == "jsonl":
        offsets = np.concatenate([np.frombuffer(r["offsets"], np.int64) for r in rows]) if rows else np.zeros(0)
        line_of = np.concatenate([np.frombuffer(r["line_of"], np.int64) + base for r, base in zip(rows, bases)]) \
            if rows else np.zeros(0)
        inp.n = len(offsets)
    if inp.n == 0:
        raise PersonavecError(f"{inp.path}: no chats in the file")
    inp.shard_size = shard_size
    if inp.fmt == "jsonl":
        size = os.path.getsize(inp.file)
        inp.spans = [(int(offsets[k * shard_size]),
                      int(offsets[(k + 1) * shard_size]) if (k + 1) * shard_size < inp.n else size,
                      int(line_of[k * shard_size]) + 1) for k in range(inp.count)]
    inp.values = {kind: [v for r in rows for v in json.loads(r["values"])[kind]] for kind, _ in stages
                  if kind in KEPT}
    return inp


def _run(ray, fns: list, name: str) -> list[dict]:
    """The rows the read functions yield: as one Ray Data job, or here, one after the other, without Ray (`ray`
    None: tests and debugging)."""
    if not fns:
        return []
    if ray is None:
        return [row for fn in fns for block in fn() for row in block.to_pylist()]
    return _read(ray, fns, name).take_all()


def _read(ray, fns: list, name: str, **kwargs):
    """A Ray Dataset from read functions, one read task each (each yields its blocks); `name` names the read in
    Ray's plan and logs (`Read<name>`)."""
    from ray.data.block import BlockMetadata
    from ray.data.datasource import Datasource, ReadTask

    class Tasks(Datasource):
        def get_name(self) -> str:
            return name

        def estimate_inmemory_data_size(self):
            return None

        def get_read_tasks(self, parallelism, per_task_row_limit=None, data_context=None):
            meta = BlockMetadata(num_rows=None, size_bytes=None, input_files=None, exec_stats=None)
            return [ReadTask(fn, meta) for fn in fns]

    # one block per task as the tasks cut it (no splitting into `parallelism` blocks)
    return ray.data.read_datasource(Tasks(), override_num_blocks=len(fns), **kwargs)


# -- the scoring pass -----------------------------------------------------------------------------------------------

def shard_payload(where: dict, shard: int, span: tuple, reader: TableReader | None = None) -> dict:
    """`{shard, first, data}` of one shard: JSONL its bytes, tables its rows as an Arrow IPC stream."""
    if where["fmt"] == "jsonl":
        start, end, first = span
        with open(where["file"], "rb") as f:
            f.seek(start)
            return {"shard": shard, "first": first, "data": f.read(end - start)}
    import pyarrow as pa

    start, stop = span
    reader = reader or TableReader(where["file"], where["path"])
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, reader.schema) as writer:
        for table in reader.tables(start, stop):
            writer.write(table.replace_schema_metadata(None))  # as `reader.schema`, which has none
    return {"shard": shard, "first": start, "data": sink.getvalue().to_pybytes()}


def decode_shard(where: dict, first: int, data: bytes) -> list[ChatRecord]:
    """The chats of a shard payload, named as `read_chats` names them."""
    if where["fmt"] == "jsonl":
        rows = []
        for number, raw in enumerate(io.BytesIO(data), start=first):
            obj = parse_jsonl_line(raw, where["path"], number)
            if obj is not None:
                rows.append((f"{where['path']}:{number}", obj))
    else:
        import pyarrow as pa

        rows = list(table_rows(where["path"], pa.ipc.open_stream(data).read_all(), first))
    return [chat_record(obj, w) for w, obj in rows]


def _read_shards(where: dict, shards: list[tuple[int, tuple]]):
    import pyarrow as pa

    reader = None if where["fmt"] == "jsonl" else TableReader(where["file"], where["path"])  # Parquet reads on
    for shard, span in shards:
        yield pa.Table.from_pylist([shard_payload(where, shard, span, reader)])


def shard_reads(inp: ChatInput, todo: list[int]) -> list:
    """The read functions of the shards in `todo`, each yielding `{shard, first, data}` rows. Consecutive shards
    share one (Parquet: the shards starting in one row group, so no task decodes a group twice over)."""
    def span(k: int) -> tuple:
        return inp.spans[k] if inp.fmt == "jsonl" else (inp.span(k).start, inp.span(k).stop)

    if inp.fmt == "parquet":
        import bisect

        starts = TableReader(inp.file).group_starts

        def together(k: int, group: list[int]) -> bool:
            def row_group(shard: int) -> int:
                return bisect.bisect_right(starts, shard * inp.shard_size)

            return row_group(k) == row_group(group[0])
    else:
        def together(k: int, group: list[int]) -> bool:
            return len(group) < SHARDS_PER_READ

    groups: list[list[int]] = []
    for k in todo:
        if groups and groups[-1][-1] == k - 1 and together(k, groups[-1]):
            groups[-1].append(k)
        else:
            groups.append([k])
    return [functools.partial(_read_shards, inp.where, [(k, span(k)) for k in g]) for g in groups]


def shard_dataset(ray, inp: ChatInput, todo: list[int], concurrency: int):
    """A Ray Dataset with one row `{shard, first, data}` per shard in `todo`, read by Ray tasks."""
    fns = shard_reads(inp, todo)
    # reading is light: no CPU reserved (the actors hold them all), and `concurrency` tasks at a time
    return _read(ray, fns, "ChatShards", num_cpus=0, concurrency=max(1, min(concurrency, len(fns))))


# -- the driver's last read -----------------------------------------------------------------------------------------

class ShardedRecords:
    """The chats of a checked input as a sequence, read shard by shard from the file: in order for a pass over
    all of them, by index for a few. What `finish_screen` and the monitor output take in place of a list; `schema`
    and `format` are a `ChatTable`'s."""

    def __init__(self, inp: ChatInput):
        self.inp = inp
        self.schema, self.format = inp.schema, inp.fmt
        self._reader = None if inp.fmt == "jsonl" else TableReader(inp.file, inp.path)
        self._cached: tuple[int, list[ChatRecord]] | None = None

    def __len__(self) -> int:
        return self.inp.n

    def shard(self, k: int) -> list[ChatRecord]:
        if self._cached is None or self._cached[0] != k:
            inp = self.inp
            if inp.fmt == "jsonl":
                payload = shard_payload(inp.where, k, inp.spans[k])
                records = decode_shard(inp.where, payload["first"], payload["data"])
            else:
                span = inp.span(k)
                records = [chat_record(row, w) for w, row in self._reader.rows(span.start, span.stop)]
            if len(records) != len(inp.span(k)):
                raise PersonavecError(f"{inp.path}: changed while the job ran; run the command again")
            self._cached = (k, records)
        return self._cached[1]

    def __getitem__(self, i: int) -> ChatRecord:
        if not 0 <= i < self.inp.n:
            raise IndexError(i)
        return self.shard(i // self.inp.shard_size)[i % self.inp.shard_size]

    def __iter__(self):
        for k in range(self.inp.count):
            yield from self.shard(k)

