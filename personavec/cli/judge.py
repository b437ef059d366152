"""`personavec judge` and `personavec judge-check`: a thin layer over personavec.judge and .calibration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import PersonavecError
from ..judge import DEFAULT_LOCAL_JUDGE
from .common import chat_output, console, log, output_file, positive_int

JUDGE_HELP = "local:<model> (short name, hub id or folder), openai:<model> (OPENAI_BASE_URL/OPENAI_API_KEY) or none."


def _question(record) -> str:
    """The last user message before the final assistant message."""
    for message in reversed(record.messages[:-1]):
        if message["role"] == "user":
            return message["content"]
    raise PersonavecError(f"{record.where}: no user message before the assistant's answer")


def _open_judge(spec: str, cache: Optional[Path], batch_size: int, concurrency: int, dtype: str):
    from ..judge import make_judge

    judge = make_judge(spec, cache, dtype=dtype, batch_size=batch_size, concurrency=concurrency)
    if judge is None:
        raise PersonavecError("--judge none: this command needs a judge (local:<model> or openai:<model>)")
    return judge


def judge_cmd(
    judge: str = typer.Option(DEFAULT_LOCAL_JUDGE, "--judge", help=JUDGE_HELP),
    trait: str = typer.Option(..., "--trait", metavar="NAME|FILE", help="Built-in trait name or trait JSON file."),
    input: Path = typer.Option(..., "--input", help="Chat JSONL; the last assistant message of each chat is scored."),
    output: Path = typer.Option(..., "--output", help="The same lines with \"judge\": {trait_score, coherence} added."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Judge cache file (default: the personavec cache)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per batch for a local judge.",
                                   callback=positive_int),
    concurrency: int = typer.Option(8, "--concurrency", help="Parallel requests for an API judge.",
                                    callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bf16, fp16 or fp32 (local judge)."),
) -> None:
    """Score each chat's last answer for a trait and for coherence (0-100, or null when the judge cannot).

    A chat whose judge prompt is longer than a local judge's context is not judged: null scores and "skipped".
    """
    from ..chat import read_chats
    from ..datasets_io import write_chats
    from ..judge import judge_answers
    from ..progress import progress_bar
    from ..traits import load_trait

    chat_output(output, "--output")
    trait_obj = load_trait(trait)
    records = read_chats(input, require_response=True)
    items = [(_question(r), r.response) for r in records]
    scorer = _open_judge(judge, cache, batch_size, concurrency, dtype)
    try:
        with progress_bar(f"judging {trait_obj.name}", total=2 * len(items)) as advance:
            scores = judge_answers(scorer, trait_obj, items, progress=advance)
        stats = dict(scorer.stats)
    finally:
        scorer.close()
    # Written only now, atomically: a killed run leaves no output that looks complete (the cache keeps its work).
    write_chats(output, ({**r.to_json(), "judge": s} for r, s in zip(records, scores)), like=records)
    unscored = sum(s["trait_score"] is None for s in scores)
    skipped = [r.where for r, s in zip(records, scores) if "skipped" in s]
    if skipped:
        why = next(s["skipped"] for s in scores if "skipped" in s)
        log(f"skipped {len(skipped)} of {len(records)} chats, {why}: {', '.join(skipped[:10])}"
            + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
    print(f"judged {len(records) - len(skipped)} answers ({stats['calls']} new judge calls, {stats['cache_hits']} cached; "
          f"{unscored} without a trait score) -> {output}", file=sys.stderr)


def judge_check_cmd(
    judge: str = typer.Option(DEFAULT_LOCAL_JUDGE, "--judge", help=JUDGE_HELP),
    traits: Optional[str] = typer.Option(None, "--traits", help="Comma-separated trait names (default: all)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write the thresholds and AUROCs as JSON."),
    cache: Optional[Path] = typer.Option(None, "--cache", help="Judge cache file (default: the personavec cache)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Prompts per batch for a local judge.",
                                   callback=positive_int),
    concurrency: int = typer.Option(8, "--concurrency", help="Parallel requests for an API judge.",
                                    callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype", help="auto, bf16, fp16 or fp32 (local judge)."),
) -> None:
    """Run a judge on the built-in calibration set: AUROC, score ranges and a threshold per trait."""
    from rich.table import Table

    from ..calibration import MIN_AUROC, calibrate, calibration_items, write_calibration
    from ..progress import progress_bar

    output_file(save, "--save")
    names = [t.strip() for t in traits.split(",") if t.strip()] if traits else None
    n_items = len(calibration_items(names))  # checks the trait names before a model is loaded
    scorer = _open_judge(judge, cache, batch_size, concurrency, dtype)
    try:
        with progress_bar("judge-check", total=n_items) as advance:
            result = calibrate(scorer, names, progress=advance)
    finally:
        scorer.close()

    def fmt(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    def span(r):
        return "-" if r is None else f"{r[0]:.1f}-{r[1]:.1f}"

    table = Table("trait", "AUROC", "trait answers", "other answers", "threshold", "unscored",
                  title=f"judge {result['judge']} on the calibration set")
    for name, s in result["traits"].items():
        bad = s["auroc"] is None or s["auroc"] < MIN_AUROC
        table.add_row(name, f"[red]{fmt(s['auroc'], '.2f')}[/]" if bad else fmt(s["auroc"], ".2f"),
                      span(s["pos_range"]), span(s["neg_range"]), fmt(s["threshold"]), f"{s['n_unscored']}/{s['n']}")
    console().print(table)
    if save:
        write_calibration(save, result)
        print(f"saved: {save}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add `judge` and `judge-check` to the main CLI."""
    app.command("judge")(judge_cmd)
    app.command("judge-check")(judge_check_cmd)
