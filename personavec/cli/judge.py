"""`personavec judge` and `personavec judge-check`: a thin layer over personavec.judge and .calibration."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import PersonavecError
from ..judge import DEFAULT_LOCAL_JUDGE
from .common import by_option, chat_output, console, log, output_file, positive_int, print_breakdown, run_folder

JUDGE_HELP = "local:<model> (short name, hub id or folder), openai:<model> (OPENAI_BASE_URL/OPENAI_API_KEY) or none."
SCHEME_HELP = ("score100 (the paper's 0-100 rubric) | yesno (P(Yes) for the trait's yes/no question) | yesno2 "
               "(mean of two yes/no phrasings). Default: the --calibration file's choice, else the choice shipped "
               "for a packaged judge, else score100.")
CALIBRATION_HELP = "Scheme and thresholds per trait from `judge-check --save` (made with this judge)."


def scheme_option(param: typer.CallbackParam, value: Optional[str]) -> Optional[str]:
    """--scheme: a known scheme name, checked at parse time."""
    from ..judge.scoring import SCHEMES

    if value is not None and value not in SCHEMES:
        raise typer.BadParameter(f"unknown scheme {value!r}; use one of {', '.join(SCHEMES)}")
    return value


def judge_plan(scorer, trait, calibration: Optional[Path], scheme: Optional[str], calibrate_self: bool,
               uses_threshold: bool = True):
    """The scheme and threshold a command judges `trait` with; says which in one line, and warns as before when
    a filtering command (`uses_threshold`) has no calibrated threshold, or when the judge separates poorly."""
    from contextlib import nullcontext

    from ..calibration import calibration_calls, plan_judging, warn_if_uncalibrated
    from ..progress import progress_bar

    may_calibrate = calibrate_self and calibration is None and scorer.spec.startswith("local:")
    bar = progress_bar("calibrating the judge", total=calibration_calls(12, [scheme] if scheme else None)) \
        if may_calibrate else nullcontext(None)
    with bar as advance:
        plan = plan_judging(scorer, trait, calibration_path=calibration, scheme=scheme,
                            calibrate_self=calibrate_self, progress=advance)
    log(plan.line(scorer.spec, trait.name))
    if plan.threshold is not None:
        warn_if_uncalibrated(scorer.spec, trait.name,
                             {"judge": scorer.spec, "traits": {trait.name: {"auroc": plan.auroc}}})
    elif uses_threshold:
        warn_if_uncalibrated(scorer.spec, trait.name, None)
    return plan


def _fmt(x) -> str:
    return "-" if x is None else f"{x:.3f}"


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


# How a judge runs, shared by `judge` and `judge-check`.
JudgeCacheOption = Annotated[Optional[Path], typer.Option("--cache", help="Judge cache file (default: the personavec "
                                                          "cache).")]
JudgeBatchSize = Annotated[int, typer.Option("--batch-size", help="Prompts per batch for a local judge.",
                                             callback=positive_int)]
JudgeConcurrency = Annotated[int, typer.Option("--concurrency", help="Parallel requests for an API judge.",
                                               callback=positive_int)]
JudgeDtype = Annotated[str, typer.Option("--dtype", help="auto, bf16, fp16 or fp32 (local judge).")]


def judge_cmd(
    judge: str = typer.Option(DEFAULT_LOCAL_JUDGE, "--judge", help=JUDGE_HELP),
    trait: str = typer.Option(..., "--trait", metavar="NAME|FILE", help="Built-in trait name or trait JSON file."),
    input: Path = typer.Option(..., "--input", help="Chat JSONL; the last assistant message of each chat is scored."),
    output: Path = typer.Option(..., "--output", help="The same lines with \"judge\": {trait_score, coherence} added."),
    cache: JudgeCacheOption = None,
    batch_size: JudgeBatchSize = 8,
    concurrency: JudgeConcurrency = 8,
    dtype: JudgeDtype = "auto",
    scheme: Optional[str] = typer.Option(None, "--scheme", help=SCHEME_HELP, callback=scheme_option),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help=CALIBRATION_HELP),
    by: Optional[str] = typer.Option(None, "--by", help="Break the trait scores down by this field of the input "
                                     "lines (a dotted path such as meta.source): count, mean, sd and 95% CI per value, "
                                     "in a table, summary.json and report.html (written to --out).",
                                     callback=by_option),
    scores: Optional[str] = typer.Option(None, "--scores", help="A numeric field (dotted path, e.g. "
                                         "persona.projection from monitor) to correlate the trait score with, "
                                         "overall and per --by value."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run folder for config.json, summary.json and "
                                       "report.html (default with --by or --scores: <output stem>_run; without "
                                       "them and --out, none is written)."),
) -> None:
    """Score each chat's last answer for a trait and for coherence (0-100, or null when the judge cannot).

    The trait score uses --scheme, else the --calibration file's choice for the trait, else the scheme shipped
    for a packaged judge (personavec/data/judge_choices.json), else score100. Coherence is always 0-100.
    A chat whose judge prompt is longer than a local judge's context is not judged: null scores and "skipped".
    """
    from ..breakdown import group_keys
    from ..calibration import plan_judging, read_calibration
    from ..chat import read_chats
    from ..pipeline.judging import judge_summary, write_judge_report
    from ..pipeline.monitor import numeric_field
    from ..runs import RunDir
    from ..datasets_io import write_chats
    from ..judge import judge_answers, judge_calls, parse_spec
    from ..progress import progress_bar
    from ..traits import load_trait

    chat_output(output, "--output")
    trait_obj = load_trait(trait)
    if scheme is not None and scheme != "score100":
        trait_obj.require_yes_no(scheme)
    if calibration is not None:
        read_calibration(calibration)  # a missing or broken file is refused before the judge loads
    run_path = out or (output.with_name(output.stem + "_run") if by or scores else None)
    run_folder(run_path, "--out")
    records = read_chats(input, require_response=True)
    items = [(_question(r), r.response) for r in records]
    # fields the summary needs are checked before the judge loads
    score_values = [numeric_field(r, scores) for r in records] if scores else None
    keys = group_keys(records, by) if by else None
    if parse_spec(judge).kind == "none":
        _open_judge(judge, cache, batch_size, concurrency, dtype)  # says why, before a run folder is made
    run = None
    if run_path is not None:  # locked from here, so the output and its run folder come from one run
        run = RunDir.replace(run_path, {"command": "judge", "judge": judge, "trait": trait_obj.name, "scheme": scheme,
                                        "calibration": None if calibration is None else str(calibration),
                                        "input": str(input), "output": str(output), "by": by, "scores": scores})
    scorer = _open_judge(judge, cache, batch_size, concurrency, dtype)
    try:
        plan = plan_judging(scorer, trait_obj, calibration_path=calibration, scheme=scheme, calibrate_self=False)
        why = plan.source if calibration else "--scheme" if scheme else "the default for this judge"
        log(f"judge {scorer.spec} for {trait_obj.name}: scheme {plan.scheme} ({why})")
        with progress_bar(f"judging {trait_obj.name}", total=judge_calls(plan.scheme) * len(items)) as advance:
            judged = judge_answers(scorer, trait_obj, items, progress=advance, scheme=plan.scheme)
        stats = dict(scorer.stats)
    finally:
        scorer.close()
    # Written only now, atomically: a killed run leaves no output that looks complete (the cache keeps its work).
    rows = [{**r.to_json(), "judge": {**s, "scheme": plan.scheme}} for r, s in zip(records, judged)]
    write_chats(output, rows, like=records)
    unscored = sum(s["trait_score"] is None for s in judged)
    skipped = [r.where for r, s in zip(records, judged) if "skipped" in s]
    if skipped:
        why = next(s["skipped"] for s in judged if "skipped" in s)
        log(f"skipped {len(skipped)} of {len(records)} chats, {why}: {', '.join(skipped[:10])}"
            + (f" and {len(skipped) - 10} more" if len(skipped) > 10 else ""))
    print(f"judged {len(records) - len(skipped)} answers ({stats['calls']} new judge calls, {stats['cache_hits']} cached; "
          f"{unscored} without a trait score) -> {output}", file=sys.stderr)
    if run is not None:
        summary = judge_summary(rows, trait_obj.name, plan.scheme, score_values, scores, by, keys)
        summary.update(judge=scorer.spec, input=str(input), output=str(output))
        run.write_json("summary.json", summary)
        write_judge_report(run.file("report.html"), f"personavec judge: {trait_obj.name} on {input}", rows, summary,
                           score_values, keys)
        if scores:
            c = summary["correlation"]
            log(f"trait score vs {scores}: Pearson r {_fmt(c['pearson'])}, Spearman ρ {_fmt(c['spearman'])} "
                f"(n {c['n']})")
        if by:
            print_breakdown(summary["by"], f"{trait_obj.name} score ({plan.scheme}) by {by}")
        print(f"report: {run.file('report.html')}", file=sys.stderr)


def judge_check_cmd(
    judge: str = typer.Option(DEFAULT_LOCAL_JUDGE, "--judge", help=JUDGE_HELP),
    traits: Optional[str] = typer.Option(None, "--traits", help="Comma-separated trait names (default: all)."),
    save: Optional[Path] = typer.Option(None, "--save", help="Write each trait's best scheme, its threshold and "
                                        "every scheme's AUROC as JSON (for --calibration)."),
    schemes: Optional[str] = typer.Option(None, "--schemes", help="Comma-separated schemes (default: all)."),
    cache: JudgeCacheOption = None,
    batch_size: JudgeBatchSize = 8,
    concurrency: JudgeConcurrency = 8,
    dtype: JudgeDtype = "auto",
) -> None:
    """Run a judge on the built-in calibration set: per trait and scheme, AUROC, score ranges and a threshold.

    Each trait's best scheme (highest AUROC; ties: the larger standardised gap between the classes) is marked;
    --save records it with its threshold, and judge, extract, evaluate and monitor --study take it with
    --calibration.
    """
    from rich.table import Table

    from ..calibration import MIN_AUROC, calibrate, calibration_calls, calibration_items, write_calibration
    from ..judge.scoring import SCHEMES
    from ..progress import progress_bar

    output_file(save, "--save")
    names = [t.strip() for t in traits.split(",") if t.strip()] if traits else None
    wanted = [x.strip() for x in schemes.split(",") if x.strip()] if schemes else None
    for name in wanted or []:
        if name not in SCHEMES:
            raise PersonavecError(f"--schemes {schemes}: unknown scheme {name!r}; use {', '.join(SCHEMES)}")
    n_items = len(calibration_items(names))  # checks the trait names before a model is loaded
    scorer = _open_judge(judge, cache, batch_size, concurrency, dtype)
    try:
        with progress_bar("judge-check", total=calibration_calls(n_items, wanted)) as advance:
            result = calibrate(scorer, names, progress=advance, schemes=wanted)
    finally:
        scorer.close()

    def fmt(x, spec=".1f"):
        return "-" if x is None else format(x, spec)

    def span(r):
        return "-" if r is None else f"{r[0]:.1f}-{r[1]:.1f}"

    used = list(dict.fromkeys(x for entry in result["traits"].values() for x in entry["schemes"]))
    columns = ["trait"]
    for x in used:
        columns += [f"{x} AUROC", f"{x} trait / other answers", f"{x} threshold"]
    table = Table(*columns, "best", "unscored", title=f"judge {result['judge']} on the calibration set")
    for name, entry in result["traits"].items():
        cells = [name]
        for x in used:
            s = entry["schemes"].get(x)
            if s is None:  # a trait without a yes/no question
                cells += ["-", "-", "-"]
                continue
            bad = s["auroc"] is None or s["auroc"] < MIN_AUROC
            auc = fmt(s["auroc"], ".2f")
            cells += [f"[red]{auc}[/]" if bad else auc, f"{span(s['pos_range'])} / {span(s['neg_range'])}",
                      fmt(s["threshold"])]
        best = entry["schemes"][entry["scheme"]]
        cells += [entry["scheme"], f"{best['n_unscored']}/{best['n']}"]
        table.add_row(*cells)
    console().print(table)
    if save:
        write_calibration(save, result)
        print(f"saved: {save}", file=sys.stderr)


def register(app: typer.Typer) -> None:
    """Add `judge` and `judge-check` to the main CLI."""
    app.command("judge")(judge_cmd)
    app.command("judge-check")(judge_check_cmd)
