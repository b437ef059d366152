"""Chat files as Parquet and as Hugging Face `datasets` folders: round trips, column types, bad rows, the CLI."""

import json

import pytest

from conftest import CHATS
from personavec.chat import read_chats
from personavec.datasets_io import chat_format, kept_path, write_chats
from personavec.errors import PersonavecError

pa = pytest.importorskip("pyarrow", reason="Parquet needs pyarrow: pip install 'personavec[ray]'")
pq = pytest.importorskip("pyarrow.parquet")


def rows():
    out = [{"row": i, "messages": c, "source": f"s{i}"} for i, c in enumerate(CHATS)]
    out[1] = {**out[1], "messages": [{**m, "name": "ann"} if m["role"] == "user" else m for m in CHATS[1]]}
    return out


def test_format_is_picked_by_suffix_and_folder(tmp_path):
    assert chat_format(tmp_path / "a.jsonl") == "jsonl" and chat_format(tmp_path / "a") == "jsonl"
    assert chat_format(tmp_path / "a.parquet") == "parquet" and chat_format(tmp_path / "a.hf") == "hf"
    assert kept_path(tmp_path / "o.jsonl").name == "o.kept.jsonl"
    assert kept_path(tmp_path / "o.parquet").name == "o.kept.parquet"
    assert kept_path(tmp_path / "o.hf").name == "o.kept.hf"


def test_jsonl_parquet_jsonl_round_trip_is_exact(tmp_path):
    src = tmp_path / "in.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in rows()))
    records = read_chats(src)
    write_chats(tmp_path / "mid.parquet", [r.to_json() for r in records], like=records)
    back = read_chats(tmp_path / "mid.parquet")
    assert [r.where for r in back] == [f"{tmp_path / 'mid.parquet'}:row {i}" for i in range(3)]
    # a message key only some messages have ("name") is not invented on the others
    assert [r.to_json() for r in back] == [r.to_json() for r in records]
    write_chats(tmp_path / "out.jsonl", [r.to_json() for r in back], like=back)
    assert [json.loads(x) for x in (tmp_path / "out.jsonl").read_text().splitlines()] == \
        [r.to_json() for r in records]


def test_parquet_output_keeps_column_types_and_adds_the_persona_struct(tmp_path):
    table = pa.Table.from_pylist(rows(), schema=pa.schema([
        ("row", pa.int32()), ("source", pa.large_string()),
        ("messages", pa.list_(pa.struct([("role", pa.string()), ("content", pa.string()), ("name", pa.string())])))]))
    pq.write_table(table, tmp_path / "in.parquet")
    records = read_chats(tmp_path / "in.parquet")
    personas = [{"layer": 2, "projection": 0.5 * i} for i in range(3)]
    write_chats(tmp_path / "out.parquet", [{**r.to_json(), "persona": p} for r, p in zip(records, personas)],
                like=records)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.names == ["row", "source", "messages", "persona"]
    assert out.schema.field("row").type == pa.int32() and out.schema.field("source").type == pa.large_string()
    assert pa.types.is_struct(out.schema.field("persona").type)
    assert out.column("persona").to_pylist() == personas and out.column("row").to_pylist() == [0, 1, 2]


def test_datasets_folder_round_trip(tmp_path):
    datasets = pytest.importorskip("datasets", reason="needs datasets: pip install 'personavec[datasets]'")
    datasets.Dataset.from_list(rows()).save_to_disk(str(tmp_path / "in_ds"))
    records = read_chats(tmp_path / "in_ds")
    assert [r.fields["row"] for r in records] == [0, 1, 2] and records[1].messages[1]["name"] == "ann"
    write_chats(tmp_path / "out.hf", [{**r.to_json(), "persona": {"p": float(i)}} for i, r in enumerate(records)],
                like=records)
    ds = datasets.load_from_disk(str(tmp_path / "out.hf"))
    assert ds.column_names == ["row", "messages", "source", "persona"] and ds[2]["persona"] == {"p": 2.0}
    # writing again replaces the folder (no temp folders left beside it)
    write_chats(tmp_path / "out.hf", [r.to_json() for r in records], like=records)
    assert "persona" not in datasets.load_from_disk(str(tmp_path / "out.hf")).column_names
    assert sorted(p.name for p in tmp_path.iterdir()) == ["in_ds", "out.hf"]
    datasets.DatasetDict(train=datasets.Dataset.from_list(rows())).save_to_disk(str(tmp_path / "dd"))
    with pytest.raises(PersonavecError, match=r"dd: is a DatasetDict with splits train; give one split's folder"):
        read_chats(tmp_path / "dd")


@pytest.mark.parametrize("row, error", [
    ({"x": 1}, 'missing "messages"'),
    ({"messages": []}, '"messages" must be a non-empty list'),
    ({"messages": [{"role": "robot", "content": "hi"}]}, "messages[0] has role 'robot'"),
])
def test_bad_parquet_rows_name_the_row_like_jsonl_names_the_line(tmp_path, row, error):
    good = {"messages": CHATS[0]}
    pq.write_table(pa.Table.from_pylist([good, good, {**{"messages": None}, **row}]), tmp_path / "bad.parquet")
    (tmp_path / "bad.jsonl").write_text("".join(json.dumps(r) + "\n" for r in (good, good, row)))
    with pytest.raises(PersonavecError) as parquet_error:
        read_chats(tmp_path / "bad.parquet")
    with pytest.raises(PersonavecError) as jsonl_error:
        read_chats(tmp_path / "bad.jsonl")
    parquet_where, jsonl_where = f"{tmp_path / 'bad.parquet'}:row 2: ", f"{tmp_path / 'bad.jsonl'}:3: "
    assert str(jsonl_error.value).startswith(jsonl_where + error)
    if "messages" in row:  # the same message, the row index where JSONL names the line
        assert str(parquet_error.value) == parquet_where + str(jsonl_error.value).removeprefix(jsonl_where)
    else:  # a Parquet file has the column for every row (null here), which reads as "not a list"
        assert str(parquet_error.value) == parquet_where + '"messages" must be a non-empty list'


def test_wrong_types_in_a_parquet_row(tmp_path):
    pq.write_table(pa.Table.from_pylist([{"messages": [{"role": "user", "content": 7}]}]), tmp_path / "t.parquet")
    with pytest.raises(PersonavecError, match=r"t.parquet:row 0: messages\[0\].content must be a string"):
        read_chats(tmp_path / "t.parquet")
    pq.write_table(pa.Table.from_pylist([{"x": 1}]), tmp_path / "n.parquet")
    with pytest.raises(PersonavecError, match=r'n.parquet:row 0: missing "messages"'):
        read_chats(tmp_path / "n.parquet")
    (tmp_path / "junk.parquet").write_text("not parquet")
    with pytest.raises(PersonavecError, match="junk.parquet: not a readable Parquet file"):
        read_chats(tmp_path / "junk.parquet")


def test_a_missing_package_names_the_extra(tmp_path, monkeypatch, capsys):
    import sys

    from test_cli import run_cli

    pq.write_table(pa.Table.from_pylist([{"messages": CHATS[0]}]), tmp_path / "x.parquet")
    for name in ("pyarrow", "pyarrow.parquet", "datasets"):
        monkeypatch.setitem(sys.modules, name, None)  # `import pyarrow` now raises ImportError
    with pytest.raises(PersonavecError, match=r"x.parquet: reading Parquet needs pyarrow, which is not installed: "
                                              r"pip install 'personavec\[ray\]'"):
        read_chats(tmp_path / "x.parquet")
    code, _, err = run_cli(capsys, "monitor", "--model", "m", "--vector", "v", "--input", tmp_path / "x.parquet",
                           "--output", tmp_path / "o.hf")
    assert code == 2 and err.strip() == f"error: --output {tmp_path / 'o.hf'}: writing a datasets folder needs " \
        "datasets, which is not installed: pip install 'personavec[datasets]'"


def test_monitor_and_screen_read_and_write_parquet_and_datasets_without_ray(tiny_folder, tmp_path, capsys,
                                                                            monkeypatch):
    from personavec.models import load_model
    from test_cli import run_cli
    from test_uses import random_vector

    datasets = pytest.importorskip("datasets")
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(tiny_folder, dtype="fp32")
    vector_path = tmp_path / "v.safetensors"
    random_vector(model, layer=2).save(vector_path)
    data = [{"row": i, "messages": c, "y": i % 2} for i, c in enumerate(CHATS * 2)]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in data))
    pq.write_table(pa.Table.from_pylist(data), tmp_path / "d.parquet")
    datasets.Dataset.from_list(data).save_to_disk(str(tmp_path / "d_ds"))

    outputs = {}
    for name in ("d.jsonl", "d.parquet", "d_ds"):
        out = tmp_path / f"mon-{name}.jsonl"
        code, _, err = run_cli(capsys, "monitor", "--model", tiny_folder, "--vector", vector_path, "--input",
                               tmp_path / name, "--output", out)
        assert code == 0, err
        outputs[name] = [json.loads(x) for x in out.read_text().splitlines()]
    assert outputs["d.parquet"] == outputs["d.jsonl"] == outputs["d_ds"]
    assert [r["row"] for r in outputs["d.jsonl"]] == list(range(6))

    code, _, err = run_cli(capsys, "screen", "--model", tiny_folder, "--vector", vector_path, "--data",
                           tmp_path / "d.parquet", "--output", tmp_path / "s.parquet", "--approx", "--drop-top", "0.5",
                           "--labels", "y")
    assert code == 0, err
    scored = pq.read_table(tmp_path / "s.parquet")
    assert scored.schema.names == ["row", "messages", "y", "persona"]
    kept = pq.read_table(tmp_path / "s.kept.parquet")
    assert kept.schema.names == ["row", "messages", "y"] and kept.num_rows == 3
    code, _, err = run_cli(capsys, "screen", "--model", tiny_folder, "--vector", vector_path, "--data",
                           tmp_path / "d_ds", "--output", tmp_path / "s.hf", "--approx")
    assert code == 0, err
    hf = datasets.load_from_disk(str(tmp_path / "s.hf"))
    assert hf["persona"] == scored.column("persona").to_pylist()
    # a plain folder is still refused as an output, as before
    (tmp_path / "plain").mkdir()
    code, _, err = run_cli(capsys, "monitor", "--model", tiny_folder, "--vector", vector_path, "--input",
                           tmp_path / "d.parquet", "--output", tmp_path / "plain")
    assert code == 2 and f"--output {tmp_path / 'plain'}: is a folder" in err


@pytest.mark.parametrize("typed", [False, True])
def test_a_key_only_later_rows_have_is_kept_in_parquet(tmp_path, typed):
    """JSONL rows are sparse; pyarrow's from_pylist alone keeps only the first row's keys."""
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    src = [{"messages": chat, "id": 0}, {"messages": chat, "id": 1, "meta": {"source": "web"}},
           {"messages": chat, "id": 2, "late": 3.5}]
    like = None
    if typed:  # the streaming path: input column types known, every other key added
        pq.write_table(pa.Table.from_pylist([{"messages": chat, "id": i} for i in range(3)]), tmp_path / "in.parquet")
        like = read_chats(tmp_path / "in.parquet")
    write_chats(tmp_path / "out.parquet", src, like=like)
    out = pq.read_table(tmp_path / "out.parquet")
    assert out.schema.names == ["messages", "id", "meta", "late"]
    assert out.column("meta").to_pylist() == [None, {"source": "web"}, None]
    assert out.column("late").to_pylist() == [None, None, 3.5]
