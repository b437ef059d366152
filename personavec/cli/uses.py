"""`personavec monitor`, `screen` and `shift`: the uses of a vector, a thin layer over personavec.pipeline."""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path
from typing import Annotated, Optional

import typer

from ..errors import PersonavecError
from .common import (engine_mode_option, steering_slots_option, by_option, chat_output, command_vector, finite_float, fraction, load_engine_model, log,
                     non_negative_float, non_negative_int, positive_int, print_breakdown, run_folder, vector_layer)
from .judge import scheme_option

# The Ray options of `monitor` and `screen`, declared once.
RayFlag = Annotated[bool, typer.Option("--ray", help="score on Ray Data with an actor pool (personavec[ray]); a local "
                                       "cluster unless --ray-address")]
RayAddress = Annotated[Optional[str], typer.Option("--ray-address", help="an existing Ray cluster (implies --ray)")]
Workers = Annotated[Optional[int], typer.Option("--workers", help="--ray: actors, each holding one model (default 1)",
                                                callback=positive_int)]
GpusPerWorker = Annotated[Optional[float], typer.Option("--gpus-per-worker", help="--ray: GPUs per actor (default 0)",
                                                        callback=non_negative_float)]
CpusPerWorker = Annotated[Optional[int], typer.Option("--cpus-per-worker", help="--ray: CPUs (torch threads) per actor "
                                                      "(default: local cores / workers)", callback=positive_int)]
ShardSize = Annotated[Optional[int], typer.Option("--shard-size", help="--ray: chats per shard, the unit of retry and "
                                                  "resume (default 256)", callback=positive_int)]

VECTOR_HELP = ".safetensors vector file (or .gguf / .pt); without it, --trait NAME uses the vector shipped for --model"
LAYER_HELP = "layer to read (default: the layer recorded in the vector file)"
BY_HELP = ("break the summary down by this field of the input lines (a dotted path such as meta.source): count, "
           "mean, sd and 95% CI per value, in the table, summary.json and report.html")


def _record_dir(output: Path, out: Optional[Path]) -> Path:
    """The run folder of a command that writes one JSONL: `--out`, else `<output stem>_run/` beside it."""
    return out or output.with_name(output.stem + "_run")


def _fmt(x, spec: str = ".3f") -> str:
    from ..report import number

    return number(x, spec, missing="-")


def _print_distribution(title: str, dist: dict) -> None:
    if not dist.get("n"):
        log(f"{title}: no scored lines")
        return
    log(f"{title}: n {dist['n']}, mean {dist['mean']:.3f} ± {dist['std']:.3f}, min {dist['min']:.3f}, "
        f"p10 {dist['p10']:.3f}, median {dist['median']:.3f}, p90 {dist['p90']:.3f}, max {dist['max']:.3f}")


def _ray_config(ray: bool, address, workers, gpus_per_worker, cpus_per_worker, shard_size):
    """A RayConfig for `--ray` (or `--ray-address`), None without; the Ray-only flags are refused without it."""
    if not ray and address is None:
        given = [f for f, v in (("--workers", workers), ("--gpus-per-worker", gpus_per_worker),
                                ("--cpus-per-worker", cpus_per_worker), ("--shard-size", shard_size)) if v is not None]
        if given:
            raise PersonavecError(f"{given[0]} needs --ray")
        return None
    from ..datasets_io import need
    from ..pipeline.scale import RayConfig

    need("ray", "--ray")
    need("ray.data", "--ray")
    return RayConfig(address=address, workers=workers or 1, gpus_per_worker=gpus_per_worker or 0.0,
                     cpus_per_worker=cpus_per_worker, shard_size=shard_size or 256)


def _trait_for(vector, trait_name: Optional[str]):
    from ..traits import load_trait

    name = trait_name or vector.trait
    if not name:
        raise PersonavecError(f"{vector.label}: records no trait; pass --trait")
    return load_trait(name)


def monitor_cmd(
    model: str = typer.Option(..., "--model", help="packaged short name, hub id or local folder"),
    vector_path: Optional[Path] = typer.Option(None, "--vector", help=VECTOR_HELP),
    layer: Optional[int] = typer.Option(None, "--layer", help=LAYER_HELP, callback=non_negative_int),
    input_path: Optional[Path] = typer.Option(None, "--input", help="chats to score: .jsonl, .parquet or a datasets "
                                              "folder"),
    output: Optional[Path] = typer.Option(None, "--output", help="the same lines with \"persona\" added"),
    position: str = typer.Option("prompt_last", "--position",
                                 help="prompt_last (before answering) | prompt_avg | response_avg"),
    threshold: Optional[float] = typer.Option(None, "--threshold", help="mark lines whose projection is above it",
                                              callback=finite_float),
    scores: Optional[str] = typer.Option(None, "--scores", help="numeric field (dotted path) to correlate with"),
    top_k: int = typer.Option(10, "--top-k", help="lines shown in the summary (0: none)", callback=non_negative_int),
    by: Optional[str] = typer.Option(None, "--by", help=BY_HELP + "; with --scores, r per value", callback=by_option),
    study: Optional[str] = typer.Option(None, "--study", help="system-prompts | many-shot: the paper's experiment"),
    trait_name: Optional[str] = typer.Option(None, "--trait", help="the shipped vector for --model when no --vector; "
                                             "--study: trait (default: the vector's)"),
    judge_spec: str = typer.Option("none", "--judge", help="--study: local:MODEL | openai:MODEL | none"),
    scheme: Optional[str] = typer.Option(None, "--scheme", help="--study: judge scoring scheme (default: the "
                                         "calibrated choice)", callback=scheme_option),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="--study: judge scheme from "
                                               "`judge-check --save` (default: a local judge calibrates itself)"),
    no_calibrate: bool = typer.Option(False, "--no-calibrate", help="--study: do not calibrate a local judge"),
    shots: str = typer.Option("0,1,2,4,8", "--shots", help="--study many-shot: prefix sizes"),
    questions: Optional[int] = typer.Option(None, "--questions", help="--study: first N evaluation questions",
                                            callback=positive_int),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="--study: answer length", callback=positive_int),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: <output>_run; --study: required)"),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="skip longer chats (default: model context)",
                                             callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force", help="--study: overwrite a folder that holds a different run"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    engine_mode: Optional[str] = engine_mode_option(),
    max_steering_slots: Optional[int] = steering_slots_option(),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model",
                                             callback=positive_int),
    ray: RayFlag = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    shard_size: ShardSize = None,
) -> None:
    """Project prompts on a persona vector before the model answers (or run the paper's monitoring study)."""
    rc = _ray_config(ray, ray_address, workers, gpus_per_worker, cpus_per_worker, shard_size)
    if study is not None:
        if by is not None:
            raise PersonavecError("--by groups --input lines; --study already breaks its prompts down by condition")
        if rc is not None:
            raise PersonavecError("--ray scores --input files; --study runs in one process")
        run_folder(out, "--out")
        vector, vector_path = command_vector(vector_path, trait_name, model)
        return _study(study, model, vector, vector_path, layer, trait_name, judge_spec, shots, questions,
                      max_new_tokens, out, batch_size, dtype, force, engine, tensor_parallel_size,
                      scheme, calibration, no_calibrate)
    if input_path is None or output is None:
        raise PersonavecError("monitor needs --input and --output (or --study)")
    from ..breakdown import group_keys
    from ..chat import check_responses, numeric_field, read_chats
    from ..datasets_io import write_chats
    from ..pipeline.monitor import monitor_chats, monitor_summary, write_monitor_report
    from ..runs import RunDir

    chat_output(output, "--output")
    run_folder(_record_dir(output, out), "--out")
    vector, vector_path = command_vector(vector_path, trait_name, model)

    def run_config(layer: int) -> dict:
        return {"command": "monitor", "model": model, "vector": str(vector_path), "input": str(input_path),
                "layer": layer, "position": position, "threshold": threshold, "scores": scores, "by": by,
                **({"ray": asdict(rc)} if rc else {})}

    if rc is None:
        records = read_chats(input_path)
        if position == "response_avg":  # before the model is loaded and the run folder written
            check_responses(records, "--position response_avg averages the answer's tokens")
        score_values = [numeric_field(r, scores) for r in records] if scores else None
        keys = group_keys(records, by) if by else None  # a line without the field is refused before the model loads
        from ..backends import one_op_layers

        lm, tokenizer = load_engine_model(model, engine, dtype, tensor_parallel_size,
                                          **one_op_layers("capture", vector.layer if layer is None else layer))
        layer = vector_layer(vector, lm, layer)
        # The run folder is locked from here until the command ends: a second monitor into it is refused, so the
        # output and the run folder always come from one run.
        run = RunDir.replace(_record_dir(output, out), run_config(layer))
        rows = monitor_chats(lm, tokenizer, records, vector, layer, position, threshold, batch_size, max_length)
    else:  # Ray Data reads and checks the input; the actors load the model (and check the vector against it)
        from ..pipeline.scale import ray_monitor

        layer = vector.check_layer(layer)
        rows, score_values, keys, run, store = ray_monitor(
            input_path, vector, model, layer, position, threshold, batch_size, max_length, engine, dtype,
            tensor_parallel_size, _record_dir(output, out), run_config(layer), scores, by, rc, log)
        records = rows.records
    write_chats(output, rows, like=records)
    summary = monitor_summary(rows, top_k, threshold, score_values, by, keys, scores)
    summary.update(trait=vector.trait, layer=rows[0]["persona"]["layer"], output=str(output))
    run.write_json("summary.json", summary)
    write_monitor_report(run.file("report.html"), f"personavec monitor: {vector.trait or 'vector'} on {input_path}",
                         rows, summary, score_values, scores, keys)
    _print_distribution(f"projection at layer {summary['layer']}", summary["projection"])
    for t in summary["top"]:
        log(f"  line {t['line']:>5}  {t['projection']:+.3f}  {t['prompt']}")
    if threshold is not None:
        log(f"{summary['flagged']} of {summary['n']} lines above {threshold:g}")
    if scores:
        c = summary["correlation"]
        log(f"projection vs {scores}: Pearson r {_fmt(c['pearson'])}, Spearman ρ {_fmt(c['spearman'])} (n {c['n']})")
    if by:
        print_breakdown(summary["by"], f"projection at layer {summary['layer']} by {by}")
    if rc is not None:
        store.clear()
    print(f"wrote {output}\nreport: {run.file('report.html')}")


def _study(study, model, vector, vector_path, layer, trait_name, judge_spec, shots, questions, max_new_tokens, out,
           batch_size, dtype, force, engine, tensor_parallel_size, scheme=None, calibration=None,
           no_calibrate=False) -> None:
    from ..judge import make_judge, parse_spec
    from .judge import judge_plan
    from ..pipeline.monitor import STUDIES, StudyConfig, run_study

    if study not in STUDIES:
        raise PersonavecError(f"--study {study!r}: use {' or '.join(STUDIES)}")
    if out is None:
        raise PersonavecError("--study needs --out (the run folder)")
    try:
        shot_counts = sorted({int(x) for x in shots.split(",") if x.strip()})
    except ValueError:
        raise PersonavecError(f"--shots {shots!r}: give comma-separated counts, e.g. 0,1,2,4,8") from None
    if not shot_counts or shot_counts[0] < 0 or shot_counts[-1] > 20:
        raise PersonavecError(f"--shots {shots!r}: counts must lie in 0..20 (one per extraction question)")
    trait = _trait_for(vector, trait_name)
    parse_spec(judge_spec)
    if calibration is not None:
        from ..calibration import read_calibration

        read_calibration(calibration)
    lm, tokenizer = load_engine_model(model, engine, dtype, tensor_parallel_size)
    judge = make_judge(judge_spec)
    chosen = judge_plan(judge, trait, calibration, scheme, not no_calibrate,
                                uses_threshold=False).scheme if judge is not None else "score100"
    cfg = StudyConfig(study=study, model=model, trait=trait.name, vector=str(vector_path), judge=judge_spec,
                      layer=layer, questions=questions, shots=shot_counts, max_new_tokens=max_new_tokens,
                      batch_size=batch_size, judge_scheme=chosen)
    summary = run_study(cfg, trait, vector, lm, tokenizer, judge, out, force=force)
    for e in summary["per_condition"]:
        extra = f"  trait {e['trait_score_mean']:.1f}  r within {_fmt(e.get('pearson_within'), '+.2f')}" \
            if e.get("trait_score_mean") is not None else ""
        log(f"  {e['condition']:<16} projection {_fmt(e['projection'].get('mean'), '+.3f')}{extra}")
    log(f"projection rises with condition order: Spearman ρ {_fmt(summary['projection_vs_level_spearman'], '.2f')}")
    if "pearson" in summary:
        log(f"projection vs judged score: Pearson r {_fmt(summary['pearson'], '.2f')}, "
            f"Spearman ρ {_fmt(summary['spearman'], '.2f')}")
    print(f"report: {Path(out) / 'report.html'}")


def screen_cmd(
    model: str = typer.Option(..., "--model"),
    vector_path: Optional[Path] = typer.Option(None, "--vector", help=VECTOR_HELP),
    data: Path = typer.Option(..., "--data", help="training chats (.jsonl, .parquet or a datasets folder); the last "
                              "assistant message is the answer"),
    output: Path = typer.Option(..., "--output", help="the same lines with \"persona\" scores added"),
    layer: Optional[int] = typer.Option(None, "--layer", help=LAYER_HELP, callback=non_negative_int),
    approx: bool = typer.Option(False, "--approx", help="no base-model generation: answer minus last prompt token"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="length of the base model's greedy answers",
                                       callback=positive_int),
    drop_top: Optional[float] = typer.Option(None, "--drop-top", help="write <output>.kept.jsonl without the top "
                                             "fraction, e.g. 0.1", callback=fraction),
    keep_below: Optional[float] = typer.Option(None, "--keep-below", help="write <output>.kept.jsonl with scores < X",
                                               callback=finite_float),
    labels: Optional[str] = typer.Option(None, "--labels", help="0/1 field: print AUROC of each score against it"),
    trait_name: Optional[str] = typer.Option(None, "--trait", help="without --vector: the vector shipped for --model"),
    top_k: int = typer.Option(10, "--top-k", help="lines shown in the summary (0: none)", callback=non_negative_int),
    by: Optional[str] = typer.Option(None, "--by", help=BY_HELP + " of the ranking score; with --labels, AUROC "
                                     "per value", callback=by_option),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: <output>_run)"),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    max_length: Optional[int] = typer.Option(None, "--max-length", help="skip longer chats (default: model context)",
                                             callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    engine_mode: Optional[str] = engine_mode_option(),
    max_steering_slots: Optional[int] = steering_slots_option(),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model",
                                             callback=positive_int),
    ray: RayFlag = False,
    ray_address: RayAddress = None,
    workers: Workers = None,
    gpus_per_worker: GpusPerWorker = None,
    cpus_per_worker: CpusPerWorker = None,
    shard_size: ShardSize = None,
) -> None:
    """Score training data by projection difference (the paper's ΔP) to find samples that push a trait."""
    from ..chat import read_chats
    from ..pipeline.screen import ScreenConfig, run_screen

    if drop_top is not None and keep_below is not None:
        raise PersonavecError("use either --drop-top or --keep-below, not both")
    rc = _ray_config(ray, ray_address, workers, gpus_per_worker, cpus_per_worker, shard_size)
    from ..datasets_io import kept_path

    chat_output(output, "--output")
    if drop_top is not None or keep_below is not None:
        chat_output(kept_path(output), "--output")
    run_folder(_record_dir(output, out), "--out")
    vector, vector_path = command_vector(vector_path, trait_name, model)
    cfg = ScreenConfig(model=model, vector=str(vector_path), data=str(data), layer=layer, approx=approx,
                       max_new_tokens=max_new_tokens, batch_size=batch_size, max_length=max_length)
    if rc is None:
        records = read_chats(data, require_response=True)
        if by:
            from ..breakdown import group_keys

            group_keys(records, by)  # a line without the field is refused before the model loads
        if labels:
            from ..pipeline.screen import read_labels

            read_labels(records, labels)  # likewise a line without a 0/1 label
        from ..backends import one_op_layers

        lm, tokenizer = load_engine_model(model, engine, dtype, tensor_parallel_size,
                                          **one_op_layers("capture", vector.layer if layer is None else layer))
        s = run_screen(cfg, records, vector, lm, tokenizer, output, _record_dir(output, out), labels, drop_top,
                       keep_below, top_k, by=by)
    else:  # Ray Data reads and checks the input and the actors load the model; after the scores it is run_screen's
        from ..pipeline.scale import ray_screen, ray_task
        from ..pipeline.screen import BaseAnswerCache

        task = ray_task(model, engine, dtype, tensor_parallel_size, cfg, str(BaseAnswerCache.default_path()))
        s = ray_screen(cfg, vector, task, rc, output, _record_dir(output, out), labels, drop_top, keep_below, top_k,
                       log, by=by)
    for name, dist in s["distribution"].items():
        _print_distribution(f"{name} at layer {s['layer']}", dist)
    log(f"dataset mean {s['rank_by']}: {_fmt(s['mean'][s['rank_by']])}")
    if s["skipped"]:
        log(f"{s['skipped']} lines longer than the context limit were not scored")
    for t in s["top"]:
        log(f"  line {t['line']:>5}  {t['score']:+.3f}  {t['answer'][:80]}")
    if labels:
        log("AUROC against " + labels + ": " + ", ".join(f"{k} {_fmt(v, '.3f')}" for k, v in s["auroc"].items()))
    if by:
        print_breakdown(s["by"], f"{s['rank_by']} at layer {s['layer']} by {by}")
    if "filtered" in s:
        f = s["filtered"]
        log(f"kept {f['kept']} of {f['of']} ({f['rule']}) -> {f['path']}")
    print(f"wrote {output}\nreport: {_record_dir(output, out) / 'report.html'}")


def shift_cmd(
    base: str = typer.Option(..., "--base", help="the model before fine-tuning"),
    finetuned: str = typer.Option(..., "--finetuned", help="full model folder/id, or a peft LoRA adapter folder"),
    vector_path: Optional[Path] = typer.Option(None, "--vector", help=VECTOR_HELP),
    trait_name: Optional[str] = typer.Option(None, "--trait", help="evaluation questions (default: the vector's trait); "
                                             "without --vector, also the vector shipped for --base"),
    judge_spec: str = typer.Option("none", "--judge", help="local:MODEL | openai:MODEL | none"),
    layer: Optional[int] = typer.Option(None, "--layer", help=LAYER_HELP, callback=non_negative_int),
    questions: Optional[int] = typer.Option(None, "--questions", help="first N evaluation questions",
                                            callback=positive_int),
    prompt_only: bool = typer.Option(False, "--prompt-only", help="skip the response-mean shift (no generation "
                                     "unless a judge is given)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", callback=positive_int),
    out: Optional[Path] = typer.Option(None, "--out", help="run folder (default: runs/shift-<finetuned>-<trait>)"),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force"),
    engine: str = typer.Option("hf", "--engine", help="hf only: shift holds two models at once"),
) -> None:
    """How far fine-tuning moved a model along the persona vector (and, with a judge, its trait score)."""
    from ..judge import make_judge
    from ..models import load_model
    from ..pipeline.shift import ShiftConfig, run_shift

    if engine != "hf":
        raise PersonavecError(f"--engine {engine}: shift compares two models (or a base and its adapter) side by side; "
                              "the vLLM engine holds one model per process, so use --engine hf")
    vector, vector_path = command_vector(vector_path, trait_name, base)
    trait = _trait_for(vector, trait_name)
    cfg = ShiftConfig(base=base, finetuned=finetuned, vector=str(vector_path), trait=trait.name, judge=judge_spec,
                      layer=layer, questions=questions, responses=not prompt_only, max_new_tokens=max_new_tokens,
                      batch_size=batch_size)
    out = run_folder(out or Path("runs") / f"shift-{Path(finetuned.rstrip('/')).name}-{trait.name}", "--out")
    judge = make_judge(judge_spec)
    lm, tokenizer = load_model(base, dtype=dtype)
    s = run_shift(cfg, trait, vector, lm, tokenizer, judge, out, force=force, dtype=dtype)
    for position, value in s["shift"].items():
        log(f"{position} shift along {trait.name} at layer {s['layer']}: {value:+.3f} (cosine {s['cosine'][position]:+.3f})")
    if "scores" in s:
        b, f = s["scores"]["base"]["trait"], s["scores"]["finetuned"]["trait"]
        log(f"judged {trait.name} score: base {_fmt(b, '.1f')} -> finetuned {_fmt(f, '.1f')} "
            f"(change {_fmt(s['trait_score_change'], '+.1f')})")
    print(f"report: {Path(out) / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command("monitor")(monitor_cmd)
    app.command("screen")(screen_cmd)
    app.command("shift")(shift_cmd)
