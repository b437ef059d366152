"""`personavec extract`, `evaluate` and `demo`: the paper's pipeline, its steering curve, and the README's demo."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PersonavecError
from .common import (engine_mode_option, steering_slots_option, console, finite_float, int_list, load_engine_model, log, non_negative_float, non_negative_int,
                     number_list, positive_int, print_breakdown, run_folder)
from .judge import judge_plan, scheme_option

SCHEME_HELP = "judge scoring scheme: score100 | yesno | yesno2 (default: the calibrated choice)"
CALIBRATE_HELP = ("a local judge and no --calibration: calibrate on the trait's built-in labelled answers once "
                  "(cached) for its scheme and thresholds; --no-calibrate uses the fixed 50")


def _check_calibration(path: Optional[Path]) -> None:
    if path is not None:
        from ..calibration import read_calibration

        read_calibration(path)  # a missing or broken file is refused before any model loads


def extract_cmd(
    model: str = typer.Option(..., "--model"),
    trait_name: str = typer.Option(..., "--trait", help="built-in trait name or a trait JSON file"),
    judge_spec: str = typer.Option(..., "--judge", help="local:MODEL | openai:MODEL | none"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    questions: Optional[int] = typer.Option(None, "--questions", help="use the first N extraction questions",
                                            callback=positive_int),
    samples: int = typer.Option(1, "--samples-per-question", callback=positive_int),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", callback=positive_int),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy", callback=non_negative_float),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    seed: int = typer.Option(0, "--seed"),
    pos_threshold: Optional[float] = typer.Option(None, "--pos-threshold", help="default 50, or the calibrated threshold",
                                                  callback=finite_float),
    neg_threshold: Optional[float] = typer.Option(None, "--neg-threshold", help="default 50, or the calibrated threshold",
                                                  callback=finite_float),
    coherence_threshold: float = typer.Option(50.0, "--coherence-threshold", callback=finite_float),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="scheme and thresholds from "
                                               "`judge-check --save` (made with this judge)"),
    scheme: Optional[str] = typer.Option(None, "--scheme", help=SCHEME_HELP, callback=scheme_option),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help=CALIBRATE_HELP),
    layers: Optional[str] = typer.Option(None, "--layers", help="candidate layers, e.g. 8,10,12 (default: 5 over the middle)"),
    sweep_coef: float = typer.Option(0.5, "--sweep-coef", help="norm-relative coefficient for the layer sweep",
                                     callback=finite_float),
    sweep_questions: int = typer.Option(5, "--sweep-questions", callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force", help="overwrite a folder that holds a different run"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    engine_mode: Optional[str] = engine_mode_option(),
    max_steering_slots: Optional[int] = steering_slots_option(),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model",
                                             callback=positive_int),
    recipe: str = typer.Option("paper", "--recipe", help="paper (the paper's instruction pairs) | registers (each "
                               "pair also asks for one written form, the same on both sides)"),
    check: Optional[list[Path]] = typer.Option(None, "--check", metavar="FILE", help="labelled chat JSONL (\"label\": 1 shows the "
                                               "trait, 0 does not; repeat for more): AUROC of the new vector's "
                                               "readings per layer, in summary.json under \"checks\" and the report"),
) -> None:
    """The paper's pipeline: generate pos/neg answers, judge, filter, vectors, choose a layer, report.

    With a local judge and no --calibration the judge calibrates itself on the trait's built-in labelled answers
    (once; cached by judge fingerprint and scheme): its best scheme and threshold are used and named in one line.
    --pos-threshold / --neg-threshold override the thresholds; --no-calibrate uses the fixed 50.
    """
    from ..judge import make_judge, parse_spec
    from ..pipeline.check import read_check_files
    from ..pipeline.extract import ExtractConfig, check_recipe, run_extract
    from ..traits import load_trait

    run_folder(out, "--out")
    candidate_layers = int_list(layers, "--layers") if layers else None
    checks = read_check_files(check)  # a bad check file is refused before any model loads
    trait = load_trait(trait_name)
    check_recipe(recipe, trait)
    parse_spec(judge_spec)
    _check_calibration(calibration)
    if scheme is not None and scheme != "score100":
        trait.require_yes_no(scheme)
    lm, tokenizer = load_engine_model(model, engine, dtype, tensor_parallel_size)
    judge = make_judge(judge_spec)
    threshold, chosen, calib = 50.0, "score100", None
    if judge is not None:
        plan = judge_plan(judge, trait, calibration, scheme, not no_calibrate)
        chosen, calib = plan.scheme, plan.calibration
        threshold = plan.threshold if plan.threshold is not None else 50.0
    cfg = ExtractConfig(
        model=model, trait=trait_name, judge=judge_spec, questions=questions, samples_per_question=samples,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
        pos_threshold=threshold if pos_threshold is None else pos_threshold,
        neg_threshold=threshold if neg_threshold is None else neg_threshold,
        coherence_threshold=coherence_threshold,
        candidate_layers=candidate_layers,
        sweep_coef=sweep_coef, sweep_questions=sweep_questions, dtype=dtype, judge_scheme=chosen, recipe=recipe)
    if pos_threshold is not None or neg_threshold is not None:
        log(f"thresholds: pos {cfg.pos_threshold:.1f}, neg {cfg.neg_threshold:.1f} (flags), scheme {chosen}")
    result = run_extract(cfg, trait, lm, tokenizer, judge, out, force=force, judge_calibration=calib, checks=checks)
    s = result.summary
    log(f"kept {s['counts']['pairs_kept']} of {s['counts']['pairs']} pairs; layer {s['layer']} ({s['layer_method']})")
    for name, entry in s.get("checks", {}).items():
        r, a = entry["response_projection"], entry["approx_projection_difference"]
        log(f"check {name}: AUROC at layer {s['layer']}: response projection {_auroc(r['auroc'])}, approx ΔP "
            f"{_auroc(a['auroc'])}; best layer {r['best_layer']} ({_auroc(r['best_auroc'])})")
    print(f"vectors: {out / 'vectors.safetensors'}\nreport: {out / 'report.html'}")


def _auroc(value) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def evaluate_cmd(
    model: str = typer.Option(..., "--model"),
    trait_name: str = typer.Option(..., "--trait"),
    vector_path: Path = typer.Option(..., "--vector"),
    coefs: str = typer.Option(..., "--coefs", help="comma-separated, e.g. -1,-0.5,0,0.5,1"),
    judge_spec: str = typer.Option(..., "--judge"),
    out: Path = typer.Option(..., "--out"),
    layer: Optional[int] = typer.Option(None, "--layer", help="default: the layer recorded in the vector file",
                                        callback=non_negative_int),
    coef_mode: str = typer.Option("norm", "--coef-mode", help="norm (relative to activation norm) | raw"),
    questions: Optional[int] = typer.Option(None, "--questions", callback=positive_int),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens", callback=positive_int),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    capability: bool = typer.Option(False, "--capability", help="also multiple-choice accuracy under each coefficient"),
    baseline: bool = typer.Option(True, "--baseline/--no-baseline", help="also the same questions unsteered under "
                                  "the trait's pos and neg instructions (the prompting baseline)"),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    engine_mode: Optional[str] = engine_mode_option(),
    max_steering_slots: Optional[int] = steering_slots_option(),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model",
                                             callback=positive_int),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="judge scheme from `judge-check --save`"),
    scheme: Optional[str] = typer.Option(None, "--scheme", help=SCHEME_HELP, callback=scheme_option),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help=CALIBRATE_HELP),
    by: Optional[str] = typer.Option(None, "--by", help="break the steered answers' trait scores down by coef (95% "
                                     "CI per coefficient) or question (per question, with r against coef)"),
) -> None:
    """Steering curve: trait and coherence scores for each coefficient (and capability with --capability).

    The trait score uses the judge's calibrated scheme (a local judge calibrates itself once, as in extract).
    """
    from ..judge import make_judge, parse_spec
    from ..pipeline.evaluate import EvaluateConfig, check_evaluate_by, run_evaluate
    from ..traits import load_trait
    from ..vectors import PersonaVector

    check_evaluate_by(by)
    if parse_spec(judge_spec).kind == "none":
        raise PersonavecError("--judge none: evaluate scores the steered answers for the trait and for coherence, "
                              "so it needs a judge (local:<model> or openai:<model>); to just see steered answers, "
                              "use `personavec steer`")
    coef_values = number_list(coefs, "--coefs")
    run_folder(out, "--out")
    trait = load_trait(trait_name)
    vector = PersonaVector.load(vector_path)
    _check_calibration(calibration)
    if scheme is not None and scheme != "score100":
        trait.require_yes_no(scheme)
    if capability and engine != "hf":
        raise PersonavecError("--capability scores next-token logits with the transformers model; use --engine hf")
    lm, tokenizer = load_engine_model(model, engine, dtype, tensor_parallel_size)
    judge = make_judge(judge_spec)
    plan = judge_plan(judge, trait, calibration, scheme, not no_calibrate, uses_threshold=False)
    cfg = EvaluateConfig(model=model, trait=trait_name, vector=str(vector_path), judge=judge_spec,
                         coefs=coef_values, layer=layer, coef_mode=coef_mode, questions=questions,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, capability=capability,
                         judge_scheme=plan.scheme, baseline=baseline)
    summary = run_evaluate(cfg, trait, vector, lm, tokenizer, judge, out, force=force, by=by)
    _print_curve(summary)
    if by:
        print_breakdown(summary["by"], f"{summary['trait']} score of the steered answers by {by}")
    print(f"report: {out / 'report.html'}")


def _print_curve(summary: dict) -> None:
    from rich.table import Table

    table = Table(title=f"{summary['trait']}: steering curve at layer {summary['layer']} ({summary['coef_mode']})")
    for column in ("coef", "trait", "coherence", "capability"):
        table.add_column(column)
    fmt = lambda s: "-" if s["mean"] is None else f"{s['mean']:.1f} ± {s['std']:.1f}"  # noqa: E731
    for e in summary["per_coef"]:
        cap = e.get("capability_accuracy")
        table.add_row(f"{e['coef']:+g}", fmt(e["trait"]), fmt(e["coherence"]), "-" if cap is None else f"{cap:.0%}")
    console(stderr=True).print(table)


def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    model: str = typer.Option("qwen2.5-coder-0.5b", "--model"),
    judge_spec: str = typer.Option("local:qwen2.5-coder-1.5b", "--judge"),
    trait_name: str = typer.Option("optimistic", "--trait"),
    quick: bool = typer.Option(False, "--quick", help="no judge: a vector from a built-in contrastive set on smollm2-135m"),
    force: bool = typer.Option(False, "--force"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    engine_mode: Optional[str] = engine_mode_option(),
    max_steering_slots: Optional[int] = steering_slots_option(),
) -> None:
    """The README's first command: extract a trait on the packaged model, choose a layer, steer both ways, report."""
    run_folder(out, "--out")
    if quick:
        if engine != "hf":
            raise PersonavecError("--quick runs on transformers only; drop --engine")
        return _quick_demo(out, force)
    from ..judge import make_judge
    from ..pipeline.evaluate import EvaluateConfig, evaluate_run_config, run_evaluate
    from ..pipeline.extract import ExtractConfig, run_extract
    from ..runs import RunDir
    from ..traits import load_trait

    trait = load_trait(trait_name)
    lm, tokenizer = load_engine_model(model, engine)
    judge = make_judge(judge_spec)
    # The small local judge compresses its scale, so the paper's fixed 50 does not transfer: calibrate first
    # (once per judge and trait; cached), which also picks the scoring scheme.
    plan = judge_plan(judge, trait, None, None, True)
    calib, threshold = plan.calibration, plan.threshold if plan.threshold is not None else 50.0
    cfg = ExtractConfig(model=model, trait=trait_name, judge=judge_spec, questions=4, max_new_tokens=64,
                        sweep_questions=4, batch_size=20, pos_threshold=threshold, neg_threshold=threshold,
                        judge_scheme=plan.scheme)
    # The demo owns its folder: a run left by an older demo configuration is replaced, the same one resumed.
    stale = RunDir.differences(out / "extract", {"command": "extract", **cfg.as_config()}, cfg.resume_keys)
    result = run_extract(cfg, trait, lm, tokenizer, judge, out / "extract", force=force or bool(stale),
                         judge_calibration=calib)
    c = result.vector.coef
    ecfg = EvaluateConfig(model=model, trait=trait_name, vector=str(out / "extract" / "vectors.safetensors"),
                          judge=judge_spec, coefs=[-c, 0.0, c], questions=5, max_new_tokens=64, batch_size=20,
                          judge_scheme=plan.scheme)
    stale = RunDir.differences(out / "evaluate", evaluate_run_config(ecfg, result.vector), ecfg.resume_keys)
    summary = run_evaluate(ecfg, trait, result.vector, lm, tokenizer, judge, out / "evaluate", force=force or bool(stale))
    _print_examples(out / "evaluate" / "judged.jsonl", [-c, 0.0, c], trait.name, result.vector.layer)
    _print_curve(summary)
    print(f"report: {out / 'extract' / 'report.html'}\nsteering curve: {out / 'evaluate' / 'report.html'}")


def _print_examples(judged: Path, coefs: list[float], trait: str, layer: int) -> None:
    import json

    from rich.table import Table

    rows = [json.loads(line) for line in judged.read_text().splitlines() if line.strip()]
    table = Table(title=f"{trait} vector at layer {layer}: suppress / unsteered / amplify", show_lines=True)
    table.add_column("question", overflow="fold")
    for coef in coefs:
        table.add_column(f"coef {coef:+g}", overflow="fold")
    for question in list(dict.fromkeys(r["question"] for r in rows))[:3]:
        table.add_row(question, *[next((r["answer"] for r in rows if r["question"] == question and r["coef"] == c), "")
                                  for c in coefs])
    console().print(table)


def _quick_demo(out: Path, force: bool) -> None:
    from rich.table import Table

    from ..models import load_model
    from ..pipeline.contrast import DEMO_PROMPTS, run_steering_demo

    model, coef = "smollm2-135m", 0.3
    lm, tokenizer = load_model(model)
    result = run_steering_demo(lm, tokenizer, out, coef=coef, force=force, model_name=model)
    table = Table(title=f"optimistic vector on {model}, layer {result.layer}", show_lines=True)
    for column in ("prompt", f"suppress ({-coef})", "unsteered", f"amplify (+{coef})"):
        table.add_column(column, overflow="fold")
    for p in DEMO_PROMPTS:
        table.add_row(p, *[next(r["answer"] for r in result.rows if r["prompt"] == p and r["coef"] == c) for c in (-coef, 0.0, coef)])
    console().print(table)
    print(f"report: {result.out / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command("extract")(extract_cmd)
    app.command("evaluate")(evaluate_cmd)
    app.command("demo")(demo_cmd)
