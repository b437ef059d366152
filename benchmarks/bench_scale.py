"""Screening on Ray: what the actor pool costs and buys against one process, at equal cores.

In one run, on the same chats, model, dtype, layer and vector, `screen --approx` scores (response mean and last
prompt token at layer L) computed by:
- one process: `screen_records` with all cores as torch threads (what `personavec screen` does);
- Ray, 1 worker holding all cores (`--ray --workers 1`);
- Ray, N workers with one core each (`--ray --workers N`).

The chats are written to a JSONL file first. Each Ray job is timed end to end on a running local cluster (`ray.init`
is timed apart, once): the check pass (Ray tasks read and check the file), actor start, model load in every actor,
shards read by Ray Data read tasks and scored, shards written to the run folder, and the driver's last pass over the
file (`ShardedRecords`, what writes the output beside the scores). The check pass and the last pass are also shown
apart. The single process is timed the same way, from reading the file (`read_chats`) to the scores, model load
included. Scores are checked to agree with the single process.

Usage: python benchmarks/bench_scale.py [--model smollm2-135m] [--chats 2000] [--shard-size 256]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from personavec.chat import ChatRecord, encode_chat, read_chats, write_jsonl
from personavec.models import hidden_size, load_model, n_layers
from personavec.pipeline.scale import RayConfig, check_on_ray, ray_task, score_with_ray
from personavec.pipeline.scale_read import ShardedRecords
from personavec.pipeline.screen import ScreenConfig, screen_records
from personavec.vectors import PersonaVector

ROOT = Path(__file__).resolve().parent.parent


def bench_records(n: int) -> list[ChatRecord]:
    """`n` chats from the packaged/experiment data (everyday questions with plain, trait-laden and neutral answers
    of natural lengths), numbered so no two prompts are the same."""
    chats = []
    for name in ("screen_labelled.jsonl", "optimistic_train.jsonl", "neutral_train.jsonl"):
        for line in (ROOT / "experiments" / "data" / name).read_text().splitlines():
            if line.strip():
                chats.append(json.loads(line)["messages"])
    records = []
    for i in range(n):
        messages = [dict(m) for m in chats[i % len(chats)]]
        messages[-2]["content"] = f"{messages[-2]['content']} (#{i})"
        records.append(ChatRecord(messages=messages, fields={"row": i}, where=f"bench:{i + 1}"))
    return records


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--chats", type=int, default=2000)
    parser.add_argument("--layer", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--shard-size", type=int, default=256)
    parser.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    args = parser.parse_args()

    import ray

    work = Path(tempfile.mkdtemp(prefix="bench_scale."))
    data = work / "chats.jsonl"
    write_jsonl(data, (r.to_json() for r in bench_records(args.chats)))
    megabytes = data.stat().st_size / 1e6
    cores = args.cores
    torch.set_num_threads(cores)
    t0 = time.perf_counter()
    records = read_chats(data, require_response=True)
    model, tokenizer = load_model(args.model)
    vector = PersonaVector(vectors=torch.randn(n_layers(model) + 1, hidden_size(model),
                                               generator=torch.Generator().manual_seed(0)), layer=args.layer)
    cfg = ScreenConfig(model=args.model, data=str(data), approx=True, layer=args.layer, batch_size=args.batch_size)
    t1 = time.perf_counter()
    single, _ = screen_records(model, tokenizer, records, vector, cfg, show_progress=False)
    t_single, t_score = time.perf_counter() - t0, time.perf_counter() - t1
    dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    n_tokens = sum(len(encode_chat(tokenizer, r.messages).input_ids) for r in records) / len(records)
    del model
    print(f"{args.model} ({dtype}), {len(records)} chats (~{n_tokens:.0f} tokens each), layer {args.layer}, "
          f"screen --approx, batch {args.batch_size}, shards of {args.shard_size}, {cores} cores")
    print(f"one process: {t_single:.1f} s ({t_score:.1f} s scoring)", flush=True)

    t0 = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, log_to_driver=False, configure_logging=False)
    t_init = time.perf_counter() - t0
    task = ray_task(args.model, "hf", "auto", 1, cfg)
    results = {"one process": (t_single, 0.0, args.chats / t_score)}
    phases = {}
    settings = [(1, cores)] + ([(cores, 1)] if cores > 1 else [])
    try:
        for workers, threads in settings:
            with tempfile.TemporaryDirectory() as tmp:
                rc = RayConfig(workers=workers, cpus_per_worker=threads, shard_size=args.shard_size)
                arrivals = []
                t0 = time.perf_counter()
                inp = check_on_ray(data, rc, require_response=True, stages=[("screen_answer", None)])
                t_check = time.perf_counter() - t0
                store = score_with_ray("screen", inp, vector, task, Path(tmp), rc, log=lambda m: None,
                                       on_shard=lambda k: arrivals.append((time.perf_counter(), k)))
                t_last = time.perf_counter()
                n_read = sum(1 for _ in ShardedRecords(inp))  # the driver's last pass: the input, shard by shard
                t_last = time.perf_counter() - t_last
                rows = list(store.rows())
                elapsed = time.perf_counter() - t0
            assert n_read == len(records)
            # steady state: chats in the shards that arrived after each worker's first one, over that time
            later = arrivals[workers:]
            steady = (sum(len(range(k * args.shard_size, min(len(records), (k + 1) * args.shard_size)))
                          for _, k in later) / (later[-1][0] - arrivals[workers - 1][0])) if later else float("nan")
            worst = max(abs(r["persona"]["approx_projection_difference"] - s["approx_projection_difference"])
                        for r, s in zip(rows, single))
            name = f"Ray, {workers} worker{'s' if workers > 1 else ''} x {threads} core{'s' if threads > 1 else ''}"
            results[name] = (elapsed, worst, steady)
            phases[name] = (t_check, t_last)
            print(f"{name}: {elapsed:.1f} s (check pass {t_check:.1f} s, last pass {t_last:.2f} s, steady "
                  f"{steady:.1f} chats/s)", flush=True)
    finally:
        ray.shutdown()
        for f in work.iterdir():
            f.unlink()
        work.rmdir()

    print(f"local Ray cluster start (once, not in the times below): {t_init:.1f} s\n")
    print("| run | time (model load included) | chats/s | × one process | chats/s scoring (steady) | "
          "max abs score diff vs one process |")
    print("|---|---|---|---|---|---|")
    for name, (elapsed, worst, steady) in results.items():
        print(f"| {name} | {elapsed:.1f} s | {len(records) / elapsed:.1f} | {t_single / elapsed:.3f} | {steady:.1f} | "
              f"{worst:.2g} |")
    for name, (t_check, t_last) in phases.items():
        print(f"{name}: check pass (Ray tasks read and check {megabytes:.1f} MB) {t_check:.2f} s, "
              f"driver's last pass over the file {t_last:.2f} s")
    print("(bf16 kernels round differently with 1 thread than with 2, so 1-core workers differ slightly; in fp32 "
          "the scores agree to 1e-4, tests/test_ray.py)")
    one_worker = next(v for k, v in results.items() if k.startswith("Ray, 1 worker"))[0]
    print(f"\nRay overhead at equal cores (1 worker x {cores} cores vs one process): "
          f"{100 * (one_worker / t_single - 1):+.1f}% (target <= 10%)")
    if cores > 1:
        many = list(results.values())[-1][0]
        print(f"{cores} workers x 1 core vs 1 worker x {cores} cores: {one_worker / many:.2f}x the chats/s")


if __name__ == "__main__":
    main()
