"""What reading the input costs the driver, with and without `--ray`, on a synthetic chat file (no model, one core).

Each measurement runs in a fresh process and reports its time and peak memory (ru_maxrss):
- `read_chats`: what one process (`screen` without `--ray`) does first: every chat in memory;
- check pass, in-process: the read tasks of `scale_read.check_input` run here one after the other (on Ray they run in
  parallel on the workers; the driver only plans and collects a few numbers per row);
- driver's last pass: after a Ray job, `ShardedRecords` streams the checked file shard by shard and `write_chats`
  writes every chat back with a score added (as `monitor --ray` writes its output).

Usage: python benchmarks/bench_scale_read.py [--rows 100000] [--answer-words 300]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CODE = {
    "read_chats": "from personavec.chat import read_chats\nn = len(read_chats(PATH, require_response=True))",
    "check pass, in-process": (
        "from personavec.pipeline.scale_read import ChatInput, check_input\n"
        "n = check_input(None, ChatInput.open(PATH), 256, require_response=True).n"),
    "driver's last pass": (
        "from personavec.datasets_io import write_chats\n"
        "from personavec.pipeline.scale_read import ChatInput, ShardedRecords, check_input\n"
        "inp = check_input(None, ChatInput.open(PATH), 256, require_response=True)\n"
        "import resource; before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss\n"
        "t0 = time.perf_counter()\n"
        "write_chats(OUT, ({**r.to_json(), 'persona': {'layer': 20, 'projection': 0.5}} for r in ShardedRecords(inp)))\n"
        "n = inp.n\n"),
}


def measure(name: str, path: Path, out: Path) -> dict:
    script = (f"import json, resource, time\nPATH, OUT = {str(path)!r}, {str(out)!r}\nt0 = time.perf_counter()\n"
              + CODE[name] + "\nprint(json.dumps({'n': n, 's': time.perf_counter() - t0, "
              "'rss_mb': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "
              "'before_mb': locals().get('before', 0) / 1024}))")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=100_000)
    parser.add_argument("--answer-words", type=int, default=300)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path, out = Path(tmp) / "chats.jsonl", Path(tmp) / "out.jsonl"
        words = " ".join(f"word{i % 97}" for i in range(args.answer_words))
        with open(path, "w", encoding="utf-8") as f:
            for i in range(args.rows):
                f.write(json.dumps({"id": i, "messages": [{"role": "user", "content": f"question {i}?"},
                                                           {"role": "assistant", "content": words}]}) + "\n")
        size = path.stat().st_size / 1e6
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"{args.rows} chats, {size:.0f} MB of JSON Lines (this process: {base:.0f} MB)")
        print("| step | time | chats/s | peak memory of its process |")
        print("|---|---|---|---|")
        for name in CODE:
            r = measure(name, path, out)
            assert r["n"] == args.rows, r
            extra = f" ({r['before_mb']:.0f} MB after the check pass)" if r["before_mb"] else ""
            print(f"| {name} | {r['s']:.1f} s | {args.rows / r['s']:,.0f} | {r['rss_mb']:.0f} MB{extra} |", flush=True)


if __name__ == "__main__":
    main()
