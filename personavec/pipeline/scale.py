"""`screen --ray` and `monitor --ray`: the same scores, computed by a pool of Ray actors over Ray Data.

How a job runs:

1. The driver reads the chat file with the one reader every command uses (`chat.read_chats`: same one-line errors,
   labels, summary) and cuts it into shards of `shard_size` consecutive chats.
2. The shards that are not finished yet become a Ray Dataset (one block per shard), mapped with `map_batches` over
   an actor pool: each actor loads the model (a backend: transformers or one vLLM engine) and the vector once, and
   scores whole shards with the in-process code (`screen_records`, `monitor_personas`), so a score means exactly
   what it means without Ray.
3. As each shard comes back, the driver writes it atomically to `<run>/shards/part-00012.jsonl`. A killed job
   rerun with the same inputs skips the finished shards (`shards/manifest.json` records what they belong to; a
   different input or config clears them).
4. When every shard is there, the scores are put back in input order and handed to the single-process path, which
   writes the output, summary, ranking, filter and report. The shards are then removed.

Faults: Ray Data runs map actors with `max_restarts=-1` and `max_task_retries=-1`, so Ray restarts a worker that dies and runs its
shard again; the shard is written once, when it comes back whole, so no line is lost or doubled. Errors of the
user's own making (a vector for another model) are not retried: they come back as the same one-line error.

Base answers (full ΔP) go through the SQLite `BaseAnswerCache` on every worker (WAL, 60 s busy timeout), keyed by
the weights fingerprint, so a rerun or a retried shard generates nothing twice. On a multi-node cluster each node
has its own cache folder unless `PERSONAVEC_CACHE` points at shared storage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from ..atomic import atomic_write
from ..chat import ChatRecord
from ..datasets_io import need
from ..errors import PersonavecError

CRASH_ENV = "PERSONAVEC_RAY_TEST_CRASH"  # tests only: a marker file path; the first actor to see it absent dies


@dataclass
class RayConfig:
    address: str | None = None  # None: start a local cluster on this machine
    workers: int = 1
    gpus_per_worker: float = 0.0
    cpus_per_worker: int | None = None  # default: this machine's cores / workers (local), else 1
    shard_size: int = 256  # chats per shard: the unit of retry, resume and progress

    def threads(self) -> int:
        if self.cpus_per_worker:
            return self.cpus_per_worker
        if self.address:
            return 1
        return max(1, (os.cpu_count() or 1) // self.workers)


# -- the worker side ---------------------------------------------------------------------------------------------

class ShardScorer:
    """One Ray actor: one model and one vector, loaded once; scores whole shards."""

    def __init__(self, task: dict, vector, threads: int):
        import torch

        torch.set_num_threads(threads)
        from ..backends import load_backend

        self.task, self.vector = task, vector
        self.backend = load_backend(task["model"], task["engine"], task["dtype"], task["tensor_parallel_size"])
        self.cache = None
        if task["kind"] == "screen" and not task["cfg"]["approx"]:
            from .screen import BaseAnswerCache

            self.cache = BaseAnswerCache(task["cache"])

    def score(self, records: list[ChatRecord]) -> list[dict]:
        task, backend = self.task, self.backend
        if task["kind"] == "monitor":
            from .monitor import monitor_personas

            c = task["cfg"]
            personas = monitor_personas(backend, backend.tokenizer, records, self.vector, c["layer"], c["position"],
                                        c["threshold"], c["batch_size"], c["max_length"], show_progress=False)
            return [{"persona": p} for p in personas]
        from .screen import ScreenConfig, screen_records

        cfg = ScreenConfig(**task["cfg"])
        personas, answers = screen_records(backend, backend.tokenizer, records, self.vector, cfg, self.cache,
                                           show_progress=False)
        return [{"persona": p, **({"answer": answers[i]} if answers else {})} for i, p in enumerate(personas)]

    def __call__(self, batch: dict) -> dict:
        marker = os.environ.get(CRASH_ENV)
        if marker and not os.path.exists(marker):
            Path(marker).write_text(str(os.getpid()))
            os._exit(1)  # a worker process dying mid-job, as a test wants it
        shards, results, errors = [], [], []
        for shard, chats in zip(batch["shard"], batch["chats"]):
            items = json.loads(chats)
            records = [ChatRecord(messages=m, where=w) for w, m in items]
            try:
                results.append(json.dumps(self.score(records)))
                errors.append("")
            except PersonavecError as exc:  # the user's to fix: sent back as it is, never retried
                results.append("[]")
                errors.append(str(exc))
            shards.append(int(shard))
        return {"shard": shards, "results": results, "error": errors}


# -- the driver side ---------------------------------------------------------------------------------------------

class ShardStore:
    """`<run>/shards/`: finished shards as `part-NNNNN.jsonl`, and the manifest saying which job they belong to."""

    def __init__(self, run_path: Path, key: str, n: int, shard_size: int):
        self.path, self.key, self.n, self.size = Path(run_path) / "shards", key, n, shard_size
        manifest = self.path / "manifest.json"
        expected = {"key": key, "n": n, "shard_size": shard_size}
        if manifest.exists():
            try:
                same = json.loads(manifest.read_text()) == expected
            except (OSError, json.JSONDecodeError):
                same = False
            if not same:
                shutil.rmtree(self.path)
        self.path.mkdir(parents=True, exist_ok=True)
        if not manifest.exists():
            text = json.dumps(expected)
            atomic_write(manifest, lambda tmp: Path(tmp).write_text(text))

    @property
    def count(self) -> int:
        return (self.n + self.size - 1) // self.size

    def span(self, shard: int) -> range:
        return range(shard * self.size, min(self.n, (shard + 1) * self.size))

    def file(self, shard: int) -> Path:
        return self.path / f"part-{shard:05d}.jsonl"

    def load(self, shard: int) -> list[dict] | None:
        """A finished shard's rows, or None when it is missing or not whole."""
        path = self.file(shard)
        if not path.exists():
            return None
        try:
            rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        except (OSError, json.JSONDecodeError):
            return None
        return rows if [r.get("i") for r in rows] == list(self.span(shard)) else None

    def save(self, shard: int, results: list[dict]) -> None:
        span = self.span(shard)
        if len(results) != len(span):
            raise PersonavecError(f"shard {shard}: {len(results)} results for {len(span)} chats")
        text = "".join(json.dumps({"i": i, **r}, ensure_ascii=False) + "\n" for i, r in zip(span, results))
        atomic_write(self.file(shard), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def job_key(task: dict, vector, records: list[ChatRecord]) -> str:
    """What the shards depend on: the task (model, engine, settings), the vector's values and every chat (not where
    the base-answer cache lives)."""
    h = hashlib.sha256(json.dumps({k: v for k, v in task.items() if k != "cache"}, sort_keys=True,
                                  default=str).encode())
    h.update(vector.vectors.numpy().tobytes())
    for record in records:
        h.update(json.dumps(record.messages, ensure_ascii=False, sort_keys=True).encode())
    return h.hexdigest()


def _personavec_error(exc: BaseException) -> PersonavecError | None:
    """The PersonavecError a worker raised, wherever Ray wrapped it."""
    seen = set()
    todo = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, PersonavecError):
            return e
        todo += [getattr(e, "cause", None), e.__cause__, e.__context__]
    return None


class RaySession:
    """`ray.init` for a job: connect to `address`, else start a local cluster sized for the workers (and stop it
    at the end). A Ray that is already initialised in this process (a notebook, a test) is used as it is."""

    def __init__(self, rc: RayConfig):
        self.ray = need("ray", "--ray")
        need("ray.data", "--ray")
        self.rc, self.started = rc, False

    def __enter__(self):
        ray, rc = self.ray, self.rc
        if not ray.is_initialized():
            kwargs = dict(include_dashboard=False, log_to_driver=False, configure_logging=False)
            if rc.address:
                try:
                    ray.init(address=rc.address, **kwargs)
                except Exception as exc:
                    raise PersonavecError(f"--ray-address {rc.address}: cannot connect "
                                          f"({str(exc).splitlines()[0]})") from None
            else:
                ray.init(num_cpus=rc.workers * rc.threads(), num_gpus=None if rc.gpus_per_worker else 0, **kwargs)
            self.started = True
        return self

    def __exit__(self, *exc):
        if self.started:
            self.ray.shutdown()


def score_with_ray(kind: str, records: list[ChatRecord], vector, task: dict, run_path: Path, rc: RayConfig,
                   log=None, on_shard=None) -> list[dict]:
    """Per-chat results (`{"persona", ["answer"]}`) in input order, from a Ray actor pool; resumable by shard.

    `task`: `model`, `engine`, `dtype`, `tensor_parallel_size`, `cfg` (the scoring settings) and, for screen, `cache`
    (the base-answer SQLite file). `on_shard(shard)` is called after each shard is saved (progress; tests).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    task = {**task, "kind": kind}
    store = ShardStore(run_path, job_key(task, vector, records), len(records), rc.shard_size)
    done = {k: rows for k in range(store.count) if (rows := store.load(k)) is not None}
    todo = [k for k in range(store.count) if k not in done]
    if done:
        log(f"resuming: {len(done)} of {store.count} shards are done, {len(todo)} to go")
    if todo:
        with RaySession(rc) as session:
            ray = session.ray
            ctx = ray.data.DataContext.get_current()
            ctx.enable_progress_bars = False
            logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own line per shard is enough
            ctx.execution_options.preserve_order = True
            items = [{"shard": k, "chats": json.dumps([(records[i].where, records[i].messages) for i in store.span(k)],
                                                      ensure_ascii=False)} for k in todo]
            ds = ray.data.from_items(items, override_num_blocks=len(items))
            # one shard in flight per actor: a retried worker redoes one shard, and the last shards spread evenly
            pool = ray.data.ActorPoolStrategy(size=min(rc.workers, len(todo)), max_tasks_in_flight_per_actor=1)
            scored = ds.map_batches(
                ShardScorer, batch_size=1, compute=pool, num_cpus=rc.threads(),
                num_gpus=rc.gpus_per_worker or None,
                fn_constructor_kwargs={"task": task, "vector": vector, "threads": rc.threads()})
            # Ray Data creates these actors with max_restarts=-1 and max_task_retries=-1 (its defaults for map actors;
            # passing them is deprecated since Ray 2.60): a dead worker is restarted and its shard runs again.
            start, finished = time.perf_counter(), 0
            try:
                for row in scored.iter_rows():
                    if row["error"]:
                        raise PersonavecError(row["error"])
                    shard = int(row["shard"])
                    store.save(shard, json.loads(row["results"]))
                    finished += len(store.span(shard))
                    done[shard] = store.load(shard)
                    rate = finished / max(time.perf_counter() - start, 1e-9)
                    log(f"shard {shard + 1}/{store.count} done ({len(done)}/{store.count}, {rate:.1f} chats/s)")
                    if on_shard is not None:
                        on_shard(shard)
            except PersonavecError:
                raise
            except Exception as exc:
                mine = _personavec_error(exc)
                if mine is not None:
                    raise PersonavecError(str(mine)) from None
                raise
    results = [row for k in range(store.count) for row in done[k]]
    if [r["i"] for r in results] != list(range(len(records))):  # pragma: no cover - a broken shard store
        raise PersonavecError(f"{store.path}: the shards do not cover every chat once; delete the folder and rerun")
    return results


def ray_task(model: str, engine: str, dtype: str, tensor_parallel_size: int, cfg, cache: str | None = None) -> dict:
    return {"model": model, "engine": engine, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
            "cfg": cfg if isinstance(cfg, dict) else asdict(cfg), "cache": cache}


def ray_screen_scorer(cfg, vector, task: dict, rc: RayConfig, log=None, on_shard=None):
    """A `scorer` for `run_screen`: the Ray actor pool instead of the in-process model."""

    def scorer(records, run):
        results = score_with_ray("screen", records, vector, task, run.path, rc, log, on_shard)
        personas = [r["persona"] for r in results]
        answers = [r.get("answer", "") for r in results] if not cfg.approx else []
        return personas, answers

    return scorer


def ray_monitor_personas(records, vector, model: str, layer: int, position: str, threshold, batch_size: int,
                         max_length, engine: str, dtype: str, tensor_parallel_size: int, run_path: Path,
                         rc: RayConfig, log=None, on_shard=None) -> list[dict]:
    """`monitor_personas` of every chat, from the Ray actor pool (in input order)."""
    from .monitor import check_monitor_records

    check_monitor_records(records, position)
    cfg = {"layer": layer, "position": position, "threshold": threshold, "batch_size": batch_size,
           "max_length": max_length}
    task = ray_task(model, engine, dtype, tensor_parallel_size, cfg)
    return [r["persona"] for r in score_with_ray("monitor", records, vector, task, run_path, rc, log, on_shard)]


def clear_shards(run_path: Path) -> None:
    """Remove `<run>/shards/` once the output it fed is written."""
    shutil.rmtree(Path(run_path) / "shards", ignore_errors=True)
