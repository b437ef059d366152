"""`screen --ray` / `monitor --ray` on a local Ray cluster (ray.init(num_cpus=2)): the same scores, order and fields as
one process with the input read by Ray Data in many pieces (the driver never calls the single-process reader), the
same one-line errors for bad rows, a worker killed mid-job, a killed job resumed from its shards, the base-answer
cache under concurrent writers. Marked `ray`; skipped with the reason when ray is not installed (CI installs it with
the `test` extra)."""

import json
import multiprocessing
import os
import shutil

import pytest

from conftest import CHATS
from test_cli import run_cli

pytestmark = pytest.mark.ray

# more chats than shards, different lengths, extra fields that must survive (one only some lines have, an int
# beside floats, non-ASCII text)
DATA = [{"row": i, "messages": [{"role": "user", "content": f"question {i} " + "w " * (i % 5)}, CHATS[i % 3][-1]],
         "y": i % 2, "meta": {"k": [i, None]}, **({"extra": "é ✓", "w": 1} if i % 4 == 0 else {"w": 0.5})}
        for i in range(11)]


def jsonl_text(rows):
    """JSON Lines as editors leave them: a byte-order mark, a blank line, one CRLF line ending."""
    out = [json.dumps(r, ensure_ascii=False) for r in rows]
    out[3] += "\r"
    return "\ufeff" + "\n".join(out[:5] + [""] + out[5:]) + "\n"


def need_ray():
    """ray and ray.data, or a skip with the reason; under CI (which installs the `test` extra) a failure instead."""
    try:
        import ray
        import ray.data  # noqa: F401
    except ImportError as exc:
        if os.environ.get("CI"):
            pytest.fail(f"ray is not installed ({exc}); the test extra brings it: pip install -e '.[test]'")
        pytest.skip("needs ray[data]: pip install 'personavec[ray]'")
    return ray


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = need_ray()
    from personavec.pipeline.scale import CRASH_ENV

    marker = tmp_path_factory.mktemp("crash") / "crashed"
    marker.write_text("")  # present: no crash; a test deletes it to have the next shard's worker die
    old = os.environ.get(CRASH_ENV)
    os.environ[CRASH_ENV] = str(marker)  # the workers inherit the environment of the cluster started here
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, configure_logging=False)
    yield marker
    ray.shutdown()
    if old is None:
        os.environ.pop(CRASH_ENV, None)
    else:
        os.environ[CRASH_ENV] = old


@pytest.fixture
def setup(tiny_folder, tmp_path, monkeypatch):
    from personavec.models import load_model
    from test_uses import random_vector

    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    model, _ = load_model(tiny_folder, dtype="fp32")
    vector_path = tmp_path / "v.safetensors"
    random_vector(model, layer=2).save(vector_path)
    data = tmp_path / "data.jsonl"
    data.write_text(jsonl_text(DATA), encoding="utf-8")
    return tiny_folder, vector_path, data


@pytest.fixture
def many_pieces(monkeypatch):
    """The input cut fine: check tasks of ~300 bytes (cut mid-line) or 2 table rows, one shard per read task."""
    from personavec.pipeline import scale_read

    monkeypatch.setattr(scale_read, "PIECE_BYTES", 300)
    monkeypatch.setattr(scale_read, "PIECE_ROWS", 2)
    monkeypatch.setattr(scale_read, "SHARDS_PER_READ", 1)
    return scale_read


@pytest.fixture
def no_driver_reads(monkeypatch):
    """Call it to make the single-process readers fail on the driver (the Ray workers are other processes)."""
    import personavec.chat as chat
    import personavec.datasets_io as dio

    def forbid():
        def boom(*args, **kwargs):
            raise AssertionError("the driver read the input itself")

        for module, name in ((chat, "read_chats"), (chat, "iter_jsonl"), (dio, "iter_rows")):
            monkeypatch.setattr(module, name, boom)

    return forbid


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def same_rows(ray_rows, plain_rows, tol=1e-4):
    assert len(ray_rows) == len(plain_rows)
    for a, b in zip(ray_rows, plain_rows):
        assert list(a) == list(b)  # the same fields in the same order
        assert {k: v for k, v in a.items() if k != "persona"} == {k: v for k, v in b.items() if k != "persona"}
        assert set(a["persona"]) == set(b["persona"])
        for key, value in b["persona"].items():
            if isinstance(value, float):
                assert a["persona"][key] == pytest.approx(value, abs=tol), key
            else:
                assert a["persona"][key] == value, key


def screen(capsys, setup, output, *extra):
    folder, vector_path, data = setup
    code, out, err = run_cli(capsys, "screen", "--model", folder, "--vector", vector_path, "--data", data, "--output",
                             output, "--dtype", "fp32", "--max-new-tokens", "4", "--batch-size", "2", *extra)
    assert code == 0, err
    return err


def test_ray_screen_equals_one_process(ray_cluster, setup, tmp_path, capsys, many_pieces, no_driver_reads):
    """Full ΔP (base answers through the shared cache) on 2 workers, shards of 3, the input read by Ray tasks in many
    pieces and never by the driver: same lines, order, fields, scores, summary and kept file; the shards are gone
    afterwards; a rerun generates no base answer twice."""
    from personavec.pipeline.scale_read import ChatInput
    from personavec.pipeline.screen import BaseAnswerCache

    assert len(many_pieces._pieces(ChatInput.open(setup[2]))) >= 5  # check tasks cut mid-line
    screen(capsys, setup, tmp_path / "plain.jsonl", "--labels", "y", "--drop-top", "0.3", "--by", "w")
    no_driver_reads()
    cached = len(BaseAnswerCache(tmp_path / "cache" / "base_answers.sqlite"))
    (tmp_path / "cache" / "base_answers.sqlite").unlink()  # the Ray run generates (and caches) its own
    for suffix in ("-wal", "-shm"):
        (tmp_path / "cache" / f"base_answers.sqlite{suffix}").unlink(missing_ok=True)
    err = screen(capsys, setup, tmp_path / "ray.jsonl", "--labels", "y", "--drop-top", "0.3", "--by", "w", "--ray",
                 "--workers", "2", "--cpus-per-worker", "1", "--shard-size", "3")
    assert "shard 4/4 done" in err
    same_rows(lines(tmp_path / "ray.jsonl"), lines(tmp_path / "plain.jsonl"))
    assert [r["row"] for r in lines(tmp_path / "ray.jsonl")] == list(range(11))
    assert (tmp_path / "ray.kept.jsonl").read_text() == (tmp_path / "plain.kept.jsonl").read_text()  # byte for byte
    plain, ray_s = (json.loads((tmp_path / f"{n}_run" / "summary.json").read_text()) for n in ("plain", "ray"))
    assert ray_s["auroc"] == pytest.approx(plain["auroc"], abs=1e-6)
    assert [t["line"] for t in ray_s["top"]] == [t["line"] for t in plain["top"]]
    assert ray_s["filtered"]["kept"] == plain["filtered"]["kept"]
    # --by w: the breakdown from the values the check pass read (1 and 0.5 are two groups)
    assert [(g["value"], g["count"]) for g in ray_s["by"]["groups"]] == \
        [(g["value"], g["count"]) for g in plain["by"]["groups"]] == [(0.5, 8), (1, 3)]
    assert [g["mean"] for g in ray_s["by"]["groups"]] == pytest.approx([g["mean"] for g in plain["by"]["groups"]],
                                                                        abs=1e-4)
    assert (tmp_path / "ray_run" / "base_answers.jsonl").read_text() == \
        (tmp_path / "plain_run" / "base_answers.jsonl").read_text()
    assert not (tmp_path / "ray_run" / "shards").exists()
    assert len(BaseAnswerCache(tmp_path / "cache" / "base_answers.sqlite")) == cached  # written by both workers


def test_ray_monitor_parquet_equals_one_process_and_errors_are_one_line(ray_cluster, setup, tmp_path, capsys,
                                                                         many_pieces):
    """Parquet in row groups of 3, read in shards of 4 (shards straddle row groups): the same output, column types
    and summary as one process. (tests/test_scale_read.py reads datasets folders the same way, without Ray.)"""
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder, vector_path, data = setup
    pq.write_table(pa.Table.from_pylist(DATA), tmp_path / "d.parquet", row_group_size=3)
    args = ["monitor", "--model", folder, "--vector", vector_path, "--input", tmp_path / "d.parquet", "--dtype", "fp32",
            "--threshold", "0", "--scores", "row"]
    code, _, err = run_cli(capsys, *args, "--output", tmp_path / "plain.parquet")
    assert code == 0, err
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("personavec.datasets_io.iter_rows", lambda *a, **k: pytest.fail("the driver read the whole input"))
        code, _, err = run_cli(capsys, *args, "--output", tmp_path / "ray.parquet", "--ray", "--workers", "2",
                               "--shard-size", "4")
    assert code == 0, err
    plain, ray_t = pq.read_table(tmp_path / "plain.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert ray_t.schema == plain.schema and ray_t.schema.names == ["row", "messages", "y", "meta", "extra", "w",
                                                                   "persona"]
    same_rows(ray_t.to_pylist(), plain.to_pylist())
    plain_s, ray_s = (json.loads((tmp_path / f"{run}_run" / "summary.json").read_text()) for run in ("plain", "ray"))
    assert ray_s["correlation"]["pearson"] == pytest.approx(plain_s["correlation"]["pearson"], abs=1e-6)
    assert [t["line"] for t in ray_s["top"]] == [t["line"] for t in plain_s["top"]]
    assert ray_s["flagged"] == plain_s["flagged"] and ray_s["n"] == 11
    # an error in a worker (a vector made for another model) is the same one line as without Ray, not retried
    import torch
    from personavec.vectors import PersonaVector

    PersonaVector(vectors=torch.randn(5, 32), trait="x", layer=2).save(tmp_path / "other.safetensors")
    code, _, err = run_cli(capsys, "monitor", "--model", folder, "--vector", tmp_path / "other.safetensors", "--input",
                           data, "--output", tmp_path / "o.jsonl", "--ray")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and \
        "made for a model with 4 layers and hidden size 32" in err.strip().splitlines()[-1]
    assert not (tmp_path / "o.jsonl").exists()


def test_bad_rows_get_the_one_line_error_of_one_process(ray_cluster, setup, tmp_path, capsys, many_pieces):
    """Rows are checked in Ray tasks, in many pieces: a bad input gets exactly the single-process error (its line
    counted across pieces and a blank line; a bad row before a bad label further up, as `read_chats` reads first),
    before a model loads or the run folder is written. (tests/test_scale_read.py checks many more cases.)"""
    pq = pytest.importorskip("pyarrow.parquet")
    datasets = pytest.importorskip("datasets")
    import pyarrow as pa

    folder, vector_path, _ = setup

    def same_error(command, data, *extra):
        flag = "--data" if command == "screen" else "--input"
        base = [command, "--model", folder, "--vector", vector_path, flag, data, "--output", tmp_path / "o.jsonl",
                *extra]
        code, _, ray_err = run_cli(capsys, *base, "--ray")
        assert code == 2 and not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o_run").exists()
        code, _, err = run_cli(capsys, *base)
        shutil.rmtree(tmp_path / "o_run", ignore_errors=True)
        assert code == 2 and ray_err == err and len(err.strip().splitlines()) == 1 and err.startswith("error: ")
        return err.strip().removeprefix("error: ")

    rows = [dict(r) for r in DATA]
    rows[2]["y"] = 7
    rows[9] = {"row": 9, "text": "no messages"}
    bad = tmp_path / "bad.jsonl"
    bad.write_text(jsonl_text(rows), encoding="utf-8")  # a blank line after the 5th row
    assert same_error("screen", bad, "--labels", "y", "--approx") == f'{bad}:11: missing "messages"'
    # worded by the workers as the command words it (flags, not parameters)
    assert same_error("screen", tmp_path / "data.jsonl", "--by", "extra", "--approx") == \
        f"--by extra: {tmp_path / 'data.jsonl'}:2 has no field 'extra'"
    rows = [{**r, "judge": {"score": i}} for i, r in enumerate(DATA)]
    rows[8]["judge"]["score"] = None
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "bad.parquet", row_group_size=3)
    assert same_error("monitor", tmp_path / "bad.parquet", "--scores", "judge.score") == \
        f"{tmp_path / 'bad.parquet'}:row 8: field 'judge.score' is None, not a number"
    rows = [dict(r) for r in DATA]
    rows[7] = {**DATA[7], "messages": [{"role": "robot", "content": "beep"}]}
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "bad_ds"))
    assert same_error("monitor", tmp_path / "bad_ds") == \
        f"{tmp_path / 'bad_ds'}:row 7: messages[0] has role 'robot'; use one of system, user, assistant"


def test_a_worker_killed_mid_job_is_restarted_and_its_shard_retried(ray_cluster, setup, tmp_path, capsys):
    screen(capsys, setup, tmp_path / "plain.jsonl", "--approx")
    ray_cluster.unlink()  # the next worker to take a shard dies (os._exit) and leaves its pid here
    screen(capsys, setup, tmp_path / "ray.jsonl", "--approx", "--ray", "--workers", "2", "--shard-size", "2")
    assert ray_cluster.read_text().strip().isdigit()  # a worker did die
    rows = lines(tmp_path / "ray.jsonl")
    assert [r["row"] for r in rows] == list(range(11))  # nothing lost, nothing doubled
    same_rows(rows, lines(tmp_path / "plain.jsonl"))


def test_a_killed_job_resumes_from_its_finished_shards(ray_cluster, setup, tmp_path, capsys):
    from personavec.pipeline.scale import RayConfig, check_on_ray, ray_task, score_with_ray
    from personavec.pipeline.screen import ScreenConfig
    from personavec.vectors import PersonaVector

    folder, vector_path, data = setup
    screen(capsys, setup, tmp_path / "plain.jsonl", "--approx")
    vector = PersonaVector.load(vector_path)
    cfg = ScreenConfig(model=folder, vector=str(vector_path), data=str(data), approx=True, max_new_tokens=4,
                       batch_size=2)
    task = ray_task(folder, "hf", "fp32", 1, cfg)
    rc = RayConfig(workers=1, shard_size=3)
    inp = check_on_ray(data, rc, require_response=True, stages=[("screen_answer", None)])  # what screen checks
    first = []

    def stop_after_two(shard):
        first.append(shard)
        if len(first) == 2:
            raise KeyboardInterrupt  # the job is killed after two shards were written

    # what a killed `screen --ray` leaves: its run folder (config.json) and the shards finished so far
    (tmp_path / "ray_run").mkdir()
    (tmp_path / "ray_run" / "config.json").write_text(json.dumps({"command": "screen"}))
    with pytest.raises(KeyboardInterrupt):
        score_with_ray("screen", inp, vector, task, tmp_path / "ray_run", rc, log=lambda m: None,
                       on_shard=stop_after_two)
    shards = tmp_path / "ray_run" / "shards"
    assert sorted(p.name for p in shards.glob("part-*.jsonl")) == [f"part-{k:05d}.jsonl" for k in sorted(first)]
    # the same job through the command: the finished shards are not scored again
    err = screen(capsys, setup, tmp_path / "ray.jsonl", "--approx", "--ray", "--shard-size", "3")
    assert "resuming: 2 of 4 shards are done, 2 to go" in err
    for k in first:
        assert f"shard {k + 1}/4 done" not in err
    same_rows(lines(tmp_path / "ray.jsonl"), lines(tmp_path / "plain.jsonl"))
    assert not shards.exists()
    # shards of another job (here: the same chats in shards of another size) are never reused
    first.clear()
    with pytest.raises(KeyboardInterrupt):
        score_with_ray("screen", inp, vector, task, tmp_path / "ray_run", rc, log=lambda m: None,
                       on_shard=stop_after_two)
    err = screen(capsys, setup, tmp_path / "ray.jsonl", "--approx", "--ray", "--shard-size", "4")
    assert "resuming" not in err and "shard 3/3 done" in err
    same_rows(lines(tmp_path / "ray.jsonl"), lines(tmp_path / "plain.jsonl"))


def _write_answers(path, worker, n):
    from personavec.pipeline.screen import BaseAnswerCache

    cache = BaseAnswerCache(path)
    for i in range(n):
        cache.put(cache.key("fp", "4", f"prompt {worker}-{i}"), {"answer": f"a{worker}-{i}"})
        cache.get(cache.key("fp", "4", f"prompt {(worker + 1) % 4}-{i}"))


def test_the_base_answer_cache_takes_concurrent_writers(tmp_path):
    from personavec.pipeline.screen import BaseAnswerCache

    path = tmp_path / "answers.sqlite"
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=_write_answers, args=(path, w, 150)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0, 0, 0]
    cache = BaseAnswerCache(path)
    assert len(cache) == 600
    assert all(cache.get(cache.key("fp", "4", f"prompt {w}-{i}")) == {"answer": f"a{w}-{i}"}
               for w in range(4) for i in range(150))


def test_ray_flags_are_checked_before_any_work(setup, tmp_path, capsys, monkeypatch):
    import sys

    folder, vector_path, data = setup
    base = ["screen", "--model", folder, "--vector", vector_path, "--data", data, "--output", tmp_path / "o.jsonl"]
    code, _, err = run_cli(capsys, *base, "--workers", "2")
    assert code == 2 and err.strip() == "error: --workers needs --ray"
    code, _, err = run_cli(capsys, *base, "--ray", "--workers", "0")
    assert code == 2 and err.strip() == "error: --workers 0: must be at least 1"
    code, _, err = run_cli(capsys, "monitor", "--model", folder, "--vector", vector_path, "--study", "many-shot",
                           "--out", tmp_path / "s", "--ray")
    assert code == 2 and "--study runs in one process" in err
    monkeypatch.setitem(sys.modules, "ray", None)
    code, _, err = run_cli(capsys, *base, "--ray", "--approx")
    assert code == 2 and err.strip() == "error: --ray needs ray, which is not installed: pip install 'personavec[ray]'"
    assert not (tmp_path / "o.jsonl").exists() and not (tmp_path / "o_run").exists()
