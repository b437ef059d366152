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

How well a judge separates labelled answers (the README's tables), every scheme side by side:

    python benchmarks/bench_judge.py --auroc calibration|test|coherence [--judge local:qwen2.5-coder-1.5b]
        [--schemes score100,yesno,yesno2] [--choices personavec/data/judge_choices.json] [--json OUT]

- ``calibration``: the 12-per-trait set the scheme choice is made on
  (``personavec/data/judge_calibration.jsonl``);
- ``test``: the held-out set (``personavec/data/judge_test.jsonl``), never tuned on; the row "chosen"
  uses each trait's scheme from ``--choices`` (made on the calibration set);
- ``coherence``: the coherence rubric on ``personavec/data/judge_coherence.jsonl`` (label 1 = fluent).

The shipped choice (``personavec/data/judge_choices.json``, what ``personavec judge`` uses with no flag) is
written from a ``judge-check --save`` file, i.e. from the calibration set only:

    personavec judge-check --judge local:qwen2.5-coder-1.5b --save calib.json
    python benchmarks/bench_judge.py --make-choices calib.json

These runs use the judge cache (``--cache``), so a rerun costs nothing.
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


def auroc_main(args) -> None:
    import json

    from personavec.calibration import auroc, calibration_items, data_file, score_labelled, summarize
    from personavec.judge import coherence_prompt, make_judge

    spec = args.judge if args.judge != "local:smollm2-135m" else "local:qwen2.5-coder-1.5b"
    judge = make_judge(spec, args.cache, dtype=args.dtype, batch_size=args.batch_size)
    schemes = args.schemes.split(",") if args.schemes else None
    start = time.perf_counter()
    print(f"judge {spec}, set {args.auroc}, load average {os.getloadavg()[0]:.1f}", flush=True)
    if args.auroc == "coherence":
        items = calibration_items(path=data_file("judge_coherence.jsonl"), require_trait=False)
        scores = judge.score([coherence_prompt(i["question"], i["answer"]) for i in items])
        s = summarize([i["label"] for i in items], scores)
        kinds = sorted({i.get("kind", "") for i in items if not i["label"]})
        print(f"| coherence | {len(items)} ({sum(i['label'] for i in items)} fluent) | {s['auroc']:.3f} | "
              f"{s['pos_range'][0]:.1f}-{s['pos_range'][1]:.1f} | {s['neg_range'][0]:.1f}-{s['neg_range'][1]:.1f} |")
        for kind in kinds:
            sub = [(i["label"], sc) for i, sc in zip(items, scores) if i["label"] or i.get("kind") == kind]
            print(f"  fluent vs {kind}: AUROC {auroc([y for y, _ in sub], [sc for _, sc in sub]):.3f}")
        result = {"judge": spec, "set": "coherence", "summary": s, "scores": scores}
    else:
        path = data_file("judge_calibration.jsonl" if args.auroc == "calibration" else "judge_test.jsonl")
        items = calibration_items(path=path)
        choices = json.loads(Path(args.choices).read_text())["judges"].get(spec, {}).get("traits", {}) \
            if args.choices and Path(args.choices).exists() else {}
        if schemes == ["chosen"]:  # each trait under its shipped choice only (the cheapest honest measurement)
            scored = {}
            for name in dict.fromkeys(i["trait"] for i in items):
                part = [i for i in items if i["trait"] == name]
                scored.update(score_labelled(judge, part, [choices[name]["scheme"]]))
                print(f"  {name}: done ({judge.stats['calls']} calls so far)", flush=True)
        else:
            scored = score_labelled(judge, items, schemes)
        names = list(scored)
        used = list(dict.fromkeys(s for by in scored.values() for s in by))
        print("| trait | n | " + " | ".join(f"{s} AUROC | {s} trait / other answers" for s in used)
              + (" | chosen (on calibration) | chosen AUROC |" if choices else " |"))
        print("|---" * (2 + 2 * len(used) + (2 if choices else 0)) + "|")
        result = {"judge": spec, "set": args.auroc, "traits": {}}
        means = {s: [] for s in used + ["chosen"]}
        for name in names:
            labels = [i["label"] for i in items if i["trait"] == name]
            row, entry = [name, str(len(labels))], {}
            for s in used:
                if s not in scored[name]:
                    row += ["-", "-"]
                    continue
                summ = summarize(labels, scored[name][s])
                entry[s] = {**summ, "scores": scored[name][s]}
                means[s].append(summ["auroc"])
                rng = lambda r: "-" if r is None else f"{r[0]:.0f}-{r[1]:.0f}"  # noqa: E731
                row += [f"{summ['auroc']:.2f}", f"{rng(summ['pos_range'])} / {rng(summ['neg_range'])}"]
            if choices:
                c = choices.get(name, {}).get("scheme")
                a = entry[c]["auroc"] if c in entry else None
                means["chosen"].append(a)
                row += [f"{c} (threshold {choices[name]['threshold']:.1f})",
                        "-" if a is None else f"**{a:.2f}**"]
            result["traits"][name] = entry
            print("| " + " | ".join(row) + " |")
        mean = lambda xs: sum(xs) / len(xs) if xs and None not in xs else None  # noqa: E731
        cells = ["**mean**", ""]
        for s in used:
            cells += [f"{mean(means[s]):.2f}" if len(means[s]) == len(names) else "-", ""]
        if choices:
            cells += ["", f"**{mean(means['chosen']):.2f}** (min {min(means['chosen']):.2f})"]
        print("| " + " | ".join(cells) + " |")
        result["mean"] = {s: mean(v) for s, v in means.items() if v}
    print(f"{judge.stats['calls']} judge calls ({judge.stats['cache_hits']} cached) in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    judge.close()


def make_choices(calibration_path: str, out: str = "personavec/data/judge_choices.json") -> None:
    """Add one judge's per-trait choice (scheme, threshold, every scheme's AUROC) to the shipped choices file."""
    import json

    from personavec.calibration import read_calibration

    cal = read_calibration(calibration_path)
    path = Path(out)
    data = json.loads(path.read_text()) if path.exists() else {"judges": {}}
    data["judges"][cal["judge"]] = {
        "identity": cal.get("identity"),
        "made_on": "personavec/data/judge_calibration.jsonl (12 labelled answers per trait), by "
                   "`personavec judge-check --save`: the scheme with the highest AUROC, ties to the larger "
                   "standardised gap between the classes; threshold = midpoint of the class means",
        "traits": {name: {"scheme": e["scheme"], "threshold": round(e["threshold"], 2),
                          "auroc": e["auroc"],
                          "schemes": {s: {"auroc": v["auroc"], "threshold": None if v["threshold"] is None
                                          else round(v["threshold"], 2)} for s, v in e["schemes"].items()}}
                   for name, e in cal["traits"].items()},
    }
    path.write_text(json.dumps(data, indent=2) + "\n")
    print(f"wrote {path}: " + ", ".join(f"{n} {e['scheme']}" for n, e in data["judges"][cal["judge"]]["traits"].items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--make-choices", default=None, metavar="CALIBRATION_JSON",
                        help="write personavec/data/judge_choices.json from a `judge-check --save` file and exit")
    parser.add_argument("--auroc", choices=("calibration", "test", "coherence"), default=None,
                        help="AUROC of every scheme on a labelled set instead of the speed benchmark")
    parser.add_argument("--schemes", default=None, help="--auroc: comma-separated schemes (default: all; 'chosen': each trait's choice from --choices)")
    parser.add_argument("--choices", default="personavec/data/judge_choices.json",
                        help="--auroc test: the per-trait scheme choice made on the calibration set")
    parser.add_argument("--cache", default=None, help="--auroc: judge cache file (default: the personavec cache)")
    parser.add_argument("--json", default=None, help="--auroc: write every score here")
    parser.add_argument("--judge", default="local:smollm2-135m",
                        help="default local:smollm2-135m (speed), local:qwen2.5-coder-1.5b with --auroc")
    parser.add_argument("--n", type=int, default=16, help="number of judge prompts")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.make_choices:
        return make_choices(args.make_choices)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.auroc:
        return auroc_main(args)

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
