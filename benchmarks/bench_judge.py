"""Batched local judging vs one judge call at a time, on the same items, in one run.

    python benchmarks/bench_judge.py [--judge local:smollm2-135m] [--n 16] [--batch-size 8] [--threads N]

Items are trait and coherence prompts built from the built-in calibration set.
Three ways to compute the same exact p(0..100) per prompt:

- one at a time:   one prompt per prefill, then one decode step per trie branch, each
                   on a copy of the prompt's KV cache (a plain judge loop);
- per prompt:      one prompt per prefill, then one forward per trie level for all of
                   its branches (tree attention mask over the shared prompt cache);
- batched:         `--batch-size` prompts per prefill, then one forward per trie level
                   for all their branches (the library default).

Prints each throughput (judge calls per second), the speed-ups and the largest
score difference between the ways (they must agree). No cache is used.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from personavec.calibration import calibration_items  # noqa: E402
from personavec.judge import LocalJudge, coherence_prompt, expected_score, parse_spec  # noqa: E402
from personavec.models import load_model  # noqa: E402
from personavec.traits import load_trait  # noqa: E402


def prompts_for(n: int) -> list[str]:
    items = calibration_items()
    prompts = []
    for item in items:
        prompts.append(load_trait(item["trait"]).rubric_prompt(item["question"], item["answer"]))
        prompts.append(coherence_prompt(item["question"], item["answer"]))
    # spread over traits: every k-th prompt
    step = max(1, len(prompts) // n)
    return prompts[::step][:n]


def run(judge: LocalJudge, prompts: list[str]) -> tuple[float, torch.Tensor]:
    """Seconds and p(0..100) per prompt; batches group similar lengths, as `Judge.score` does."""
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    probs = torch.zeros((len(prompts), 101), dtype=torch.float64)
    start = time.perf_counter()
    for i in range(0, len(order), judge.batch_size):
        idx = order[i: i + judge.batch_size]
        probs[idx] = judge.number_probs([prompts[j] for j in idx])[0]
    return time.perf_counter() - start, probs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--judge", default="local:smollm2-135m")
    parser.add_argument("--n", type=int, default=16, help="number of judge prompts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    spec = parse_spec(args.judge)
    if spec.kind != "local":
        sys.exit("bench_judge measures local judges: use --judge local:<model>")
    model, tokenizer = load_model(spec.model, dtype=args.dtype)
    prompts = prompts_for(args.n)
    cache = Path(tempfile.mkdtemp()) / "unused.sqlite"
    ways = {
        "one at a time": LocalJudge(model, tokenizer, cache=cache, batch_size=1, max_rows=1, tree=False),
        "per prompt": LocalJudge(model, tokenizer, cache=cache, batch_size=1),
        "batched": LocalJudge(model, tokenizer, cache=cache, batch_size=args.batch_size),
    }
    n_tokens = sum(len(ways["batched"].prompt_ids(p)) for p in prompts)
    print(f"judge {args.judge} ({model.dtype}, {torch.get_num_threads()} threads, "
          f"device {model.device}, load average {os.getloadavg()[0]:.1f}); "
          f"{len(prompts)} prompts, {n_tokens / len(prompts):.0f} tokens each on average")
    run(ways["batched"], prompts[:2])  # warm-up
    seconds, scores = {}, {}
    for name, judge in ways.items():
        seconds[name], probs = run(judge, prompts)
        scores[name] = torch.tensor([expected_score(p.tolist())[0] or 0.0 for p in probs])
        print(f"  {name:14s} {len(prompts) / seconds[name]:7.2f} judge calls/s  ({seconds[name]:.1f} s)")
    base = seconds["one at a time"]
    print(f"speed-up batched vs one at a time: {base / seconds['batched']:.1f}x; "
          f"per prompt vs one at a time: {base / seconds['per prompt']:.1f}x; "
          f"batched vs per prompt: {seconds['per prompt'] / seconds['batched']:.1f}x")
    diff = max(float((scores[name] - scores["one at a time"]).abs().max()) for name in ways)
    print(f"largest score difference between the ways: {diff:.2e}")


if __name__ == "__main__":
    main()
