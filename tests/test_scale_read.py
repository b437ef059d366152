"""How `--ray` reads its input (personavec.pipeline.scale_read), without a cluster: the read tasks run here, one after
the other. The check pass, the shard payloads the actors decode and the driver's last read give exactly the rows,
`where` and errors of `read_chats`, for JSON Lines, Parquet and `datasets` folders cut into many pieces; the chunked
Arrow writer gives the same files as building the table at once. (tests/test_ray.py runs the same on Ray.)"""

import json
import random

import pytest

from conftest import CHATS
from personavec.chat import read_chats
from personavec.errors import PersonavecError, cli_style

pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow: pip install 'personavec[ray]'")
pq = pytest.importorskip("pyarrow.parquet")

# fields only some rows have, an int beside floats, nested values, non-ASCII text
ROWS = [{"row": i, "messages": [{"role": "user", "content": f"q{i} " + "é" * (i % 4)}, CHATS[i % 3][-1]],
         "y": i % 2, "meta": {"k": [i, None]}, **({"extra": "✓", "w": 1} if i % 5 == 0 else {"w": 0.5})}
        for i in range(13)]


def jsonl_text(rows):
    """As editors leave files: a byte-order mark, blank lines, a CRLF ending, no newline at the end."""
    out = [json.dumps(r, ensure_ascii=False) for r in rows]
    out[2] += "\r"
    return "\ufeff" + "\n".join(out[:4] + ["", "  "] + out[4:])


@pytest.fixture
def fine(monkeypatch):
    """Pieces of 40 bytes (cut mid-line) or 2 table rows, 2 shards per read, Parquet batches of 2 rows."""
    from personavec.datasets_io import TableReader
    from personavec.pipeline import scale_read

    monkeypatch.setattr(scale_read, "PIECE_BYTES", 40)
    monkeypatch.setattr(scale_read, "PIECE_ROWS", 2)
    monkeypatch.setattr(scale_read, "SHARDS_PER_READ", 2)
    monkeypatch.setattr(TableReader, "BATCH", 2)
    return scale_read


def write(tmp_path, fmt, rows, text=None):
    if fmt == "jsonl":
        path = tmp_path / "d.jsonl"
        path.write_bytes(text if text is not None else jsonl_text(rows).encode("utf-8"))
    elif fmt == "parquet":
        path = tmp_path / "d.parquet"
        pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=3)  # shards of 4 straddle row groups
    else:
        datasets = pytest.importorskip("datasets")
        path = tmp_path / "d_ds"
        datasets.Dataset.from_list(rows).save_to_disk(str(path))
    return path


def view(records):
    return [(r.where, r.to_json()) for r in records]


@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "hf"])
def test_pieces_shards_and_the_last_read_give_read_chats_rows(tmp_path, fine, fmt):
    from personavec.pipeline.scale_read import ChatInput, ShardedRecords, check_input, decode_shard, shard_reads

    path = write(tmp_path, fmt, ROWS)
    expected = view(read_chats(path, require_response=True))
    inp = ChatInput.open(path)
    pieces = fine._pieces(inp)
    assert len(pieces) >= 4 and sum(b - a for a, b in pieces) == (path.stat().st_size if fmt == "jsonl" else 13)
    check_input(None, inp, 4, require_response=True, stages=[("labels", "y"), ("screen_answer", None)])
    assert inp.n == 13 and inp.count == 4 and inp.values["labels"] == [r["y"] for r in ROWS]
    # what the actors get: each shard's payload, read by the scoring pass's read functions
    payloads = [row for fn in shard_reads(inp, [0, 1, 2, 3]) for block in fn() for row in block.to_pylist()]
    assert [p["shard"] for p in payloads] == [0, 1, 2, 3]
    decoded = [view(decode_shard(inp.where, p["first"], p["data"])) for p in payloads]
    assert decoded == [expected[k * 4:(k + 1) * 4] for k in range(4)]
    # a resumed job reads only the shards it still needs
    assert [p["shard"] for fn in shard_reads(inp, [1, 3]) for b in fn() for p in b.to_pylist()] == [1, 3]
    # what the driver streams at the end: in order, and by index for the top lines
    records = ShardedRecords(inp)
    assert len(records) == 13 and view(records) == expected
    order = list(range(13))
    random.Random(0).shuffle(order)
    assert [view([records[i]])[0] for i in order] == [expected[i] for i in order]
    with pytest.raises(IndexError):
        records[13]
    if fmt != "jsonl":
        assert records.schema == ChatInput.open(path).schema and records.format == fmt


def bad_jsonl(kind):
    lines = [json.dumps(r).encode() for r in ROWS]
    if kind == "json":
        lines[9] = b'{"messages": [}'
    elif kind == "object":
        lines[9] = b"[1, 2]"
    elif kind == "utf8":
        lines[9] = b'{"messages": "caf\xe9"}'
    elif kind == "bom-and-missing":
        lines[0] = '\ufeff{"x": 1}'.encode()
    elif kind == "role":
        lines[11] = json.dumps({"messages": [{"role": "robot", "content": "x"}]}).encode()
    elif kind == "label-then-row":  # a bad label early, a bad row late: read_chats reads everything first
        lines[1] = json.dumps({**ROWS[1], "y": 3}).encode()
        lines[12] = json.dumps({"x": 1}).encode()
    elif kind == "label":
        lines[7] = json.dumps({**ROWS[7], "y": None}).encode()
    elif kind == "no-answer":
        lines[5] = json.dumps({"messages": CHATS[0][:1]}).encode()
    return b"\n".join(lines[:4] + [b""] + lines[4:]) + b"\n"


@pytest.mark.parametrize("kind", ["json", "object", "utf8", "bom-and-missing", "role", "label-then-row", "label",
                                  "no-answer"])
def test_check_pass_errors_are_the_errors_of_read_chats(tmp_path, fine, kind):
    """The same one line, the line counted across pieces and the blank line, the first stage first."""
    from personavec.pipeline.scale_read import ChatInput, check_input
    from personavec.pipeline.screen import read_labels

    path = write(tmp_path, "jsonl", ROWS, bad_jsonl(kind))
    with pytest.raises(PersonavecError) as one:
        read_labels(read_chats(path, require_response=True), "y")
    with pytest.raises(PersonavecError) as ray_path:
        check_input(None, ChatInput.open(path), 4, require_response=True, stages=[("labels", "y")])
    assert str(ray_path.value) == str(one.value) and "\0" not in str(one.value)
    assert str(one.value).startswith(f"{path}:")


def test_by_keys_and_their_errors_are_group_keys(tmp_path, fine):
    """`--by FIELD`: the values come back from the check pass, and a line without the field is group_keys' error
    (naming the line inside the message, counted across pieces)."""
    from personavec.breakdown import group_keys
    from personavec.pipeline.scale_read import ChatInput, check_input

    path = write(tmp_path, "jsonl", ROWS)
    records = read_chats(path)
    inp = check_input(None, ChatInput.open(path), 4, stages=[("scores", "w"), ("by", "y")])
    assert inp.values["by"] == group_keys(records, "y") == [r["y"] for r in ROWS]
    assert inp.values["scores"] == [float(r["w"]) for r in ROWS]
    for field in ("extra", "meta"):  # missing on line 2; an object on line 1
        with cli_style(), pytest.raises(PersonavecError) as one:
            group_keys(records, field)
        with cli_style(), pytest.raises(PersonavecError) as ray_path:
            check_input(None, ChatInput.open(path), 4, stages=[("by", field)])
        assert str(ray_path.value) == str(one.value) and str(one.value).startswith(f"--by {field}: {path}:")


@pytest.mark.parametrize("fmt", ["parquet", "hf"])
def test_check_pass_errors_in_tables_name_the_row(tmp_path, fine, fmt):
    from personavec.pipeline.scale_read import ChatInput, check_input

    rows = [dict(r) for r in ROWS]
    rows[10] = {**ROWS[10], "messages": [{"role": "user", "content": "no answer"}]}
    rows[11]["w"] = None
    path = write(tmp_path, fmt, rows)
    with pytest.raises(PersonavecError) as one:
        read_chats(path, require_response=True)
    with pytest.raises(PersonavecError) as ray_path:
        check_input(None, ChatInput.open(path), 4, require_response=True)
    assert str(ray_path.value) == str(one.value) == \
        f"{path}:row 10: the chat has no final assistant message (needed here as the response)"
    stages = [("scores", "w")]  # a null where --scores wants a number, monitor's check
    with pytest.raises(PersonavecError, match=r"d(\.parquet|_ds):row 11: field 'w' is None, not a number"):
        check_input(None, ChatInput.open(path), 4, stages=stages)


def test_empty_and_missing_inputs(tmp_path):
    from personavec.pipeline.scale_read import ChatInput, check_input

    (tmp_path / "blank.jsonl").write_text("\n \n")
    with pytest.raises(PersonavecError, match=r"blank.jsonl: no chats in the file"):
        check_input(None, ChatInput.open(tmp_path / "blank.jsonl"), 4)
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(PersonavecError, match=r"empty.jsonl: no chats in the file"):
        check_input(None, ChatInput.open(tmp_path / "empty.jsonl"), 4)
    with pytest.raises(PersonavecError, match=r"nope.parquet: no such file"):
        ChatInput.open(tmp_path / "nope.parquet")
    from personavec.pipeline.scale_read import _check_piece

    where = {**ChatInput.open(write(tmp_path, "jsonl", ROWS)).where, "file": str(tmp_path / "elsewhere" / "d.jsonl")}
    (row,) = next(_check_piece(where, 0, 0, 100, False, [])).to_pylist()  # a worker on a node without the file
    assert json.loads(row["errors"]) == {"0": [0, f"{tmp_path / 'd.jsonl'}: a Ray worker cannot find it at "
                                                  f"{tmp_path / 'elsewhere' / 'd.jsonl'}; every node must be able to "
                                                  "read the input (shared storage)"]}
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(PersonavecError, match=r"junk.parquet: not a readable Parquet file"):
        ChatInput.open(tmp_path / "junk.parquet")


def test_an_input_edited_during_the_job_is_refused(tmp_path):
    from personavec.pipeline.scale_read import ChatInput, check_input

    path = write(tmp_path, "jsonl", ROWS)
    inp = check_input(None, ChatInput.open(path), 4)
    inp.check_unchanged()
    path.write_bytes(path.read_bytes() + b"\n" + json.dumps(ROWS[0]).encode())
    with pytest.raises(PersonavecError, match=r"d.jsonl: changed while the job ran; run the command again"):
        inp.check_unchanged()


def test_parquet_reads_go_on_where_the_last_one_stopped(tmp_path, monkeypatch):
    from personavec.datasets_io import TableReader

    monkeypatch.setattr(TableReader, "BATCH", 2)
    path = write(tmp_path, "parquet", ROWS)
    reader = TableReader(path)
    assert reader.group_starts == [0, 3, 6, 9, 12] and reader.num_rows == 13
    opened = []
    real = reader._file.iter_batches
    monkeypatch.setattr(reader._file, "iter_batches", lambda **kw: opened.append(kw["row_groups"].start) or real(**kw))
    rows = [[r["row"] for _, r in reader.rows(a, b)] for a, b in ((0, 4), (4, 5), (5, 9), (10, 13), (2, 3), (7, 20))]
    assert rows == [[0, 1, 2, 3], [4], [5, 6, 7, 8], [10, 11, 12], [2], [7, 8, 9, 10, 11, 12]]
    # in order the reads share one pass; a jump a whole row group ahead or back starts again at that group
    assert opened == [0, 0, 2]


def test_chunked_arrow_output_is_the_table_built_at_once(tmp_path, monkeypatch):
    """Rows with known input types go to Parquet / datasets a chunk at a time; the added columns are still typed
    from all their values (here a key that only a later chunk has, and a null in the first chunk)."""
    import personavec.datasets_io as dio

    datasets = pytest.importorskip("datasets")
    path = write(tmp_path, "parquet", ROWS)
    records = read_chats(path)
    personas = [{"layer": 2, "p": None if i < 2 else 0.5 * i, **({"skipped": "long"} if i == 9 else {})}
                for i in range(13)]
    out = [{**r.to_json(), "persona": p} for r, p in zip(records, personas)]
    whole = dio.arrow_table(out, records.schema)
    monkeypatch.setattr(dio, "CHUNK_ROWS", 3)
    dio.write_chats(tmp_path / "o.parquet", iter(out), like=records)
    got = pq.read_table(tmp_path / "o.parquet")
    assert got.schema == whole.schema and got.to_pylist() == whole.to_pylist()
    dio.write_chats(tmp_path / "o.hf", iter(out), like=records)
    hf = datasets.load_from_disk(str(tmp_path / "o.hf"))
    assert hf.data.table.to_pylist() == whole.to_pylist()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.parquet", "o.hf", "o.parquet"]  # no temp files left
