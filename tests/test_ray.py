"""`screen --ray` / `monitor --ray` on a local Ray cluster (ray.init(num_cpus=2)): the same scores, order and fields as
one process, a worker killed mid-job, a killed job resumed from its shards, the base-answer cache under concurrent
writers. Marked `ray`; skipped with the reason when ray is not installed (CI installs it with the `test` extra)."""

import json
import multiprocessing
import os

import pytest

from conftest import CHATS
from test_cli import run_cli

pytestmark = pytest.mark.ray

# more chats than shards, different lengths, extra fields that must survive
DATA = [{"row": i, "messages": [{"role": "user", "content": f"question {i} " + "w " * (i % 5)}, CHATS[i % 3][-1]],
         "y": i % 2, "meta": {"k": [i, None]}} for i in range(11)]


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
    data.write_text("".join(json.dumps(r) + "\n" for r in DATA))
    return tiny_folder, vector_path, data


def lines(path):
    return [json.loads(x) for x in path.read_text().splitlines()]


def same_rows(ray_rows, plain_rows, tol=1e-4):
    assert len(ray_rows) == len(plain_rows)
    for a, b in zip(ray_rows, plain_rows):
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


def test_ray_screen_equals_one_process(ray_cluster, setup, tmp_path, capsys):
    """Full ΔP (base answers through the shared cache) on 2 workers, shards of 3: same lines, order, fields, scores,
    summary and kept file; the shards are gone afterwards; a rerun generates no base answer twice."""
    from personavec.pipeline.screen import BaseAnswerCache

    screen(capsys, setup, tmp_path / "plain.jsonl", "--labels", "y", "--drop-top", "0.3")
    cached = len(BaseAnswerCache(tmp_path / "cache" / "base_answers.sqlite"))
    (tmp_path / "cache" / "base_answers.sqlite").unlink()  # the Ray run generates (and caches) its own
    for suffix in ("-wal", "-shm"):
        (tmp_path / "cache" / f"base_answers.sqlite{suffix}").unlink(missing_ok=True)
    err = screen(capsys, setup, tmp_path / "ray.jsonl", "--labels", "y", "--drop-top", "0.3", "--ray", "--workers", "2",
                 "--cpus-per-worker", "1", "--shard-size", "3")
    assert "shard 4/4 done" in err
    same_rows(lines(tmp_path / "ray.jsonl"), lines(tmp_path / "plain.jsonl"))
    assert [r["row"] for r in lines(tmp_path / "ray.jsonl")] == list(range(11))
    assert lines(tmp_path / "ray.kept.jsonl") == lines(tmp_path / "plain.kept.jsonl")
    plain, ray_s = (json.loads((tmp_path / f"{n}_run" / "summary.json").read_text()) for n in ("plain", "ray"))
    assert ray_s["auroc"] == pytest.approx(plain["auroc"], abs=1e-6)
    assert [t["line"] for t in ray_s["top"]] == [t["line"] for t in plain["top"]]
    assert ray_s["filtered"]["kept"] == plain["filtered"]["kept"]
    assert (tmp_path / "ray_run" / "base_answers.jsonl").read_text() == \
        (tmp_path / "plain_run" / "base_answers.jsonl").read_text()
    assert not (tmp_path / "ray_run" / "shards").exists()
    assert len(BaseAnswerCache(tmp_path / "cache" / "base_answers.sqlite")) == cached  # written by both workers


def test_ray_monitor_parquet_equals_one_process_and_errors_are_one_line(ray_cluster, setup, tmp_path, capsys):
    pq = pytest.importorskip("pyarrow.parquet")
    import pyarrow as pa

    folder, vector_path, data = setup
    pq.write_table(pa.Table.from_pylist(DATA), tmp_path / "d.parquet")
    args = ["monitor", "--model", folder, "--vector", vector_path, "--input", tmp_path / "d.parquet", "--dtype", "fp32",
            "--threshold", "0"]
    code, _, err = run_cli(capsys, *args, "--output", tmp_path / "plain.parquet")
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, "--output", tmp_path / "ray.parquet", "--ray", "--workers", "2",
                           "--shard-size", "4")
    assert code == 0, err
    plain, ray_t = pq.read_table(tmp_path / "plain.parquet"), pq.read_table(tmp_path / "ray.parquet")
    assert ray_t.schema == plain.schema and ray_t.schema.names == ["row", "messages", "y", "meta", "persona"]
    same_rows(ray_t.to_pylist(), plain.to_pylist())
    # an error in a worker (a vector made for another model) is the same one line as without Ray, not retried
    import torch
    from personavec.vectors import PersonaVector

    PersonaVector(vectors=torch.randn(5, 32), trait="x", layer=2).save(tmp_path / "other.safetensors")
    code, _, err = run_cli(capsys, "monitor", "--model", folder, "--vector", tmp_path / "other.safetensors", "--input",
                           data, "--output", tmp_path / "o.jsonl", "--ray")
    assert code == 2 and err.strip().splitlines()[-1].startswith("error: ") and \
        "made for a model with 4 layers and hidden size 32" in err.strip().splitlines()[-1]
    assert not (tmp_path / "o.jsonl").exists()


def test_a_worker_killed_mid_job_is_restarted_and_its_shard_retried(ray_cluster, setup, tmp_path, capsys):
    screen(capsys, setup, tmp_path / "plain.jsonl", "--approx")
    ray_cluster.unlink()  # the next worker to take a shard dies (os._exit) and leaves its pid here
    screen(capsys, setup, tmp_path / "ray.jsonl", "--approx", "--ray", "--workers", "2", "--shard-size", "2")
    assert ray_cluster.read_text().strip().isdigit()  # a worker did die
    rows = lines(tmp_path / "ray.jsonl")
    assert [r["row"] for r in rows] == list(range(11))  # nothing lost, nothing doubled
    same_rows(rows, lines(tmp_path / "plain.jsonl"))


def test_a_killed_job_resumes_from_its_finished_shards(ray_cluster, setup, tmp_path, capsys):
    from personavec.chat import read_chats
    from personavec.pipeline.scale import RayConfig, ray_task, score_with_ray
    from personavec.pipeline.screen import ScreenConfig
    from personavec.vectors import PersonaVector

    folder, vector_path, data = setup
    screen(capsys, setup, tmp_path / "plain.jsonl", "--approx")
    records = read_chats(data, require_response=True)
    vector = PersonaVector.load(vector_path)
    cfg = ScreenConfig(model=folder, vector=str(vector_path), data=str(data), approx=True, max_new_tokens=4,
                       batch_size=2)
    task = ray_task(folder, "hf", "fp32", 1, cfg)
    rc = RayConfig(workers=1, shard_size=3)
    first = []

    def stop_after_two(shard):
        first.append(shard)
        if len(first) == 2:
            raise KeyboardInterrupt  # the job is killed after two shards were written

    # what a killed `screen --ray` leaves: its run folder (config.json) and the shards finished so far
    (tmp_path / "ray_run").mkdir()
    (tmp_path / "ray_run" / "config.json").write_text(json.dumps({"command": "screen"}))
    with pytest.raises(KeyboardInterrupt):
        score_with_ray("screen", records, vector, task, tmp_path / "ray_run", rc, log=lambda m: None,
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
        score_with_ray("screen", records, vector, task, tmp_path / "ray_run", rc, log=lambda m: None,
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
