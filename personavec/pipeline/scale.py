"""`screen --ray` and `monitor --ray`: the same scores, computed by a pool of Ray actors over Ray Data.

How a job runs:

1. Ray Data reads and checks the input in Ray tasks (`scale_read.check_input`): every row parsed and checked as
   `read_chats` and the command's own checks do; the first bad row is the same one-line error, raised on the driver
   before any model loads. The rows are cut into shards of `shard_size` consecutive chats.
2. The shards that are not finished yet are read by Ray Data read tasks (`scale_read.shard_dataset`, one dataset row
   per shard) and mapped with `map_batches` over an actor pool: each actor loads the model (a backend:
   transformers or one vLLM engine) and the vector once, and scores whole shards with the in-process code
   (`screen_records`, `monitor_personas`), so a score means exactly what it means without Ray.
3. As each shard comes back, the driver writes its scores atomically to `<run>/shards/part-00012.jsonl`. A killed
   job rerun with the same inputs skips the finished shards (`shards/manifest.json` records what they belong to; a
   different input, edited input or config clears them).
4. When every shard is there, the driver streams the input once more, shard by shard, beside the scores into the
   single-process code that writes the output, summary, ranking, filter and report. The shards are then removed.
   The driver never holds the chats, only the scores and a few numbers per shard.

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
import warnings
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator

from ..atomic import atomic_write
from ..chat import ChatRecord
from ..datasets_io import need
from ..errors import PersonavecError, current_style, error_style
from .scale_read import ChatInput, ShardedRecords, check_input, decode_shard, shard_dataset

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
        from ..backends import load_backend, one_op_layers

        self.task, self.vector = task, vector
        layer = task["cfg"].get("layer")
        options = {**(task.get("engine_options") or {}),  # monitor and screen only capture, at one layer
                   **one_op_layers("capture", vector.layer if layer is None else layer)}
        self.backend = load_backend(task["model"], task["engine"], task["dtype"], task["tensor_parallel_size"],
                                    **(options if task["engine"] == "vllm" else {}))
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
        for shard, first, data in zip(batch["shard"], batch["first"], batch["data"]):
            try:
                with error_style(self.task.get("style", "library")):  # worded as the command on the driver words it
                    records = decode_shard(self.task["input"], int(first), data)
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

    def __init__(self, run_path: Path, key: str, inp: ChatInput):
        self.path, self.key, self.inp = Path(run_path) / "shards", key, inp
        manifest = self.path / "manifest.json"
        expected = {"key": key, "n": inp.n, "shard_size": inp.shard_size}
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
        return self.inp.count

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
        return rows if [r.get("i") for r in rows] == list(self.inp.span(shard)) else None

    def save(self, shard: int, results: list[dict]) -> None:
        span = self.inp.span(shard)
        if len(results) != len(span):
            raise PersonavecError(f"shard {shard}: {len(results)} results for {len(span)} chats")
        text = "".join(json.dumps({"i": i, **r}, ensure_ascii=False) + "\n" for i, r in zip(span, results))
        atomic_write(self.file(shard), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))

    def rows(self) -> Iterator[dict]:
        """Every chat's result, in input order, read shard by shard."""
        for k in range(self.count):
            rows = self.load(k)
            if rows is None:  # pragma: no cover - a shard store changed under the job
                raise PersonavecError(f"{self.path}: shard {k} is missing; delete the folder and rerun")
            yield from rows

    def clear(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


def job_key(task: dict, vector, inp: ChatInput) -> str:
    """What the shards depend on: the task (model, engine, settings), the vector's values and the input file (its
    path, size and modification time, and the rows found in it), not where the base-answer cache lives."""
    h = hashlib.sha256(json.dumps({k: v for k, v in task.items() if k not in ("cache", "style")}, sort_keys=True,
                                  default=str).encode())
    h.update(vector.vectors.numpy().tobytes())
    h.update(json.dumps([inp.identity, inp.n, inp.spans]).encode())
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
        # Ray Data copies its context for every job, touching its own deprecated fields: not the user's to act on
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"ray\.")
        ctx = ray.data.DataContext.get_current()
        ctx.enable_progress_bars = False
        logging.getLogger("ray.data").setLevel(logging.WARNING)  # our own line per shard is enough
        return self

    def __exit__(self, *exc):
        if self.started:
            self.ray.shutdown()


def score_with_ray(kind: str, inp: ChatInput, vector, task: dict, run_path: Path, rc: RayConfig,
                   log=None, on_shard=None) -> ShardStore:
    """Score every chat of a checked input (`check_input`) on a Ray actor pool, resumably by shard; the store
    holds every result (`{"i", "persona", ["answer"]}`) when it returns.

    `task`: `model`, `engine`, `dtype`, `tensor_parallel_size`, `cfg` (the scoring settings) and, for screen, `cache`
    (the base-answer SQLite file). `on_shard(shard)` is called after each shard is saved (progress; tests).
    """
    log = log or (lambda message: print(message, file=sys.stderr, flush=True))
    task = {**task, "kind": kind, "input": inp.where, "style": current_style()}
    store = ShardStore(run_path, job_key(task, vector, inp), inp)
    done = {k for k in range(store.count) if store.load(k) is not None}
    todo = [k for k in range(store.count) if k not in done]
    if done:
        log(f"resuming: {len(done)} of {store.count} shards are done, {len(todo)} to go")
    if not todo:
        return store
    with RaySession(rc) as session:
        ray = session.ray
        # results name their shard, so the order they come back in does not matter: none is held back
        ray.data.DataContext.get_current().execution_options.preserve_order = False
        ds = shard_dataset(ray, inp, todo, concurrency=rc.workers)
        # one shard in flight per actor: a retried worker redoes one shard, and the last shards spread evenly
        pool = ray.data.ActorPoolStrategy(size=min(rc.workers, len(todo)), max_tasks_in_flight_per_actor=1)
        scored = ds.map_batches(
            ShardScorer, batch_size=1, compute=pool, num_cpus=rc.threads(), num_gpus=rc.gpus_per_worker or None,
            fn_constructor_kwargs={"task": task, "vector": vector, "threads": rc.threads()})
        # Ray Data creates these actors with max_restarts=-1 and max_task_retries=-1 (its defaults for map actors;
        # passing them is deprecated since Ray 2.60): a dead worker is restarted and its shard runs again.
        start, finished = time.perf_counter(), 0
        with ray_errors():
            for row in scored.iter_rows():
                if row["error"]:
                    raise PersonavecError(row["error"])
                shard = int(row["shard"])
                store.save(shard, json.loads(row["results"]))
                finished += len(inp.span(shard))
                done.add(shard)
                rate = finished / max(time.perf_counter() - start, 1e-9)
                log(f"shard {shard + 1}/{store.count} done ({len(done)}/{store.count}, {rate:.1f} chats/s)")
                if on_shard is not None:
                    on_shard(shard)
    if len(done) != store.count:  # pragma: no cover - Ray Data lost a shard
        raise PersonavecError(f"{len(done)} of {store.count} shards came back; run the command again to finish")
    return store


@contextmanager
def ray_errors():
    """A PersonavecError raised inside a Ray task, however Ray wrapped it, as the one line it is."""
    try:
        yield
    except PersonavecError:
        raise
    except Exception as exc:
        mine = _personavec_error(exc)
        if mine is not None:
            raise PersonavecError(str(mine)) from None
        raise


def ray_task(model: str, engine: str, dtype: str, tensor_parallel_size: int, cfg, cache: str | None = None) -> dict:
    from ..backends import ENGINE_OPTIONS

    return {"model": model, "engine": engine, "dtype": dtype, "tensor_parallel_size": tensor_parallel_size,
            "engine_options": dict(ENGINE_OPTIONS),
            "cfg": cfg if isinstance(cfg, dict) else asdict(cfg), "cache": cache}


def check_on_ray(path, rc: RayConfig, require_response: bool = False, stages: list | None = None) -> ChatInput:
    """`ChatInput.open` (on the driver: no rows read) and the check pass (on Ray)."""
    inp = ChatInput.open(path)
    with RaySession(rc) as session, ray_errors():
        return check_input(session.ray, inp, rc.shard_size, require_response, stages)


class Answers:
    """The base answers of a finished screen job, in input order, read from its shards when iterated."""

    def __init__(self, store: ShardStore):
        self.store = store

    def __len__(self) -> int:
        return self.store.inp.n

    def __iter__(self):
        return (r.get("answer", "") for r in self.store.rows())


def ray_screen(cfg, vector, task: dict, rc: RayConfig, output, run_dir, labels_field=None, drop_top=None,
               keep_below=None, top_k: int = 20, log=None, on_shard=None, by: str | None = None) -> dict:
    """`run_screen` with the scores from a Ray actor pool and the input read by Ray Data (`cfg.data`); the same
    output, summary, filter and report."""
    from ..runs import RunDir
    from .screen import finish_screen, screen_run_config

    if drop_top is not None and keep_below is not None:
        raise PersonavecError("use either --drop-top or --keep-below, not both")
    layer = vector.check_layer(cfg.layer)
    with RaySession(rc):  # one cluster for both passes
        # what screen checks before the model loads, in its order
        stages = ([("by", by)] if by else []) + ([("labels", labels_field)] if labels_field else []) + \
            [("screen_answer", None)]
        inp = check_on_ray(cfg.data, rc, require_response=True, stages=stages)
        run = RunDir.replace(run_dir, screen_run_config(cfg, layer, labels_field, drop_top, keep_below, by,
                                                        {"ray": asdict(rc)}))
        store = score_with_ray("screen", inp, vector, task, run.path, rc, log, on_shard)
    inp.check_unchanged()
    personas = [r["persona"] for r in store.rows()]
    summary = finish_screen(cfg, ShardedRecords(inp), personas, [] if cfg.approx else Answers(store),
                            inp.values.get("labels"), vector, layer, output, run, drop_top, keep_below, top_k,
                            labels_field, by, inp.values.get("by"))
    store.clear()
    return summary


class ScoredRows:
    """The monitor output rows (each chat with its `persona`) of a finished Ray job, read from the input when
    iterated; `personas` is held (what the summary and report read)."""

    def __init__(self, records: ShardedRecords, personas: list[dict]):
        self.records, self.personas = records, personas

    def __len__(self) -> int:
        return len(self.personas)

    def __getitem__(self, i: int) -> dict:
        return {**self.records[i].to_json(), "persona": self.personas[i]}

    def __iter__(self):
        return ({**r.to_json(), "persona": p} for r, p in zip(self.records, self.personas))


def ray_monitor(input_path, vector, model: str, layer: int, position: str, threshold, batch_size: int, max_length,
                engine: str, dtype: str, tensor_parallel_size: int, run_dir, run_config: dict, scores_field, by,
                rc: RayConfig, log=None, on_shard=None):
    """`monitor --input` on Ray: `(rows, score values or None, by keys or None, run, store)`; the rows stream from
    the input file."""
    from ..errors import arg
    from ..runs import RunDir
    from .monitor import MONITOR_POSITIONS

    if position not in MONITOR_POSITIONS:
        raise PersonavecError(f"{arg('position', repr(position))}: use {', '.join(MONITOR_POSITIONS)}")
    stages = ([("response", "--position response_avg averages the answer's tokens")]
              if position == "response_avg" else []) + ([("scores", scores_field)] if scores_field else []) + \
        ([("by", by)] if by else [])  # what monitor checks before the model loads, in its order
    cfg = {"layer": layer, "position": position, "threshold": threshold, "batch_size": batch_size,
           "max_length": max_length}
    with RaySession(rc):
        inp = check_on_ray(input_path, rc, stages=stages)
        run = RunDir.replace(run_dir, run_config)
        store = score_with_ray("monitor", inp, vector, ray_task(model, engine, dtype, tensor_parallel_size, cfg),
                               run.path, rc, log, on_shard)
    inp.check_unchanged()
    rows = ScoredRows(ShardedRecords(inp), [r["persona"] for r in store.rows()])
    return rows, inp.values.get("scores"), inp.values.get("by"), run, store


def clear_shards(run_path: Path) -> None:
    """Remove `<run>/shards/` once the output it fed is written."""
    shutil.rmtree(Path(run_path) / "shards", ignore_errors=True)
