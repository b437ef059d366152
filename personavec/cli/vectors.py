"""`personavec vector`, `steer` and `export`: make a vector from your own chats, steer with it, convert it."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PersonavecError
from .common import (engine_mode_option, steering_slots_option, chat_output, command_vector, console, run_folder, finite_float, load_engine_model, log, non_negative_float, non_negative_int,
                     output_file, positive_int, vector_layer)
from ..shipped import BUILD_MODELS


def vector_cmd(
    model: str = typer.Option(..., "--model", help="packaged short name, hub id or local folder"),
    pos: Path = typer.Option(..., "--pos", help="chat JSONL showing the trait"),
    neg: Path = typer.Option(..., "--neg", help="chat JSONL not showing it"),
    out: Path = typer.Option(..., "--out", help="output .safetensors"),
    position: str = typer.Option("response_avg", "--position", help="response_avg | prompt_avg | prompt_last"),
    trait: str = typer.Option("", "--trait", help="trait name recorded in the file"),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where the CPU/GPU supports it) | bf16 | fp32"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """A persona vector from your own contrastive chats (no generation, no judge).

    Chats longer than the model's context are skipped and listed; they are neither in the mean nor in the counts.
    """
    from ..models import load_model
    from ..pipeline.contrast import contrastive_vector, read_contrast_files

    output_file(out, "--out")
    pos_records, neg_records = read_contrast_files(str(pos), str(neg), position)
    lm, tokenizer = load_model(model, dtype=dtype, trust_remote_code=trust_remote_code)
    vector, _ = contrastive_vector(lm, tokenizer, pos_records, neg_records, position=position, trait=trait,
                                   batch_size=batch_size)
    vector.model = model
    vector.save(out)
    skipped = vector.extra.get("skipped", {})
    note = "".join(f", {len(v)} {side} skipped" for side, v in skipped.items())
    log(f"wrote {out}: {vector.n_layers + 1} layers x {vector.hidden}, {vector.n_pos} pos / {vector.n_neg} neg"
        f"{note}, recommended layer {vector.layer}")


def steer_cmd(
    model: str = typer.Option(..., "--model"),
    vector_path: Optional[Path] = typer.Option(None, "--vector", help=".safetensors (or .gguf / .pt) vector file"),
    trait_name: Optional[str] = typer.Option(None, "--trait", help="without --vector: the vector shipped for --model"),
    coef: float = typer.Option(..., "--coef", help="steering strength; negative suppresses the trait",
                               callback=finite_float),
    layer: Optional[int] = typer.Option(None, "--layer", help="default: the layer recorded in the vector file",
                                        callback=non_negative_int),
    prompt: Optional[str] = typer.Option(None, "--prompt", help="one user message; prints only the answer"),
    system: Optional[str] = typer.Option(None, "--system", help="system message for --prompt / interactive chat"),
    input_path: Optional[Path] = typer.Option(None, "--input", help="chat JSONL to answer (the chats are the prompts)"),
    output_path: Optional[Path] = typer.Option(None, "--output", help="where --input answers go (chats whose prompt "
                                               "is longer than the model's context get no answer and \"skipped\")"),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", callback=positive_int),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy", callback=non_negative_float),
    coef_mode: Optional[str] = typer.Option(None, "--coef-mode", help="raw: coef * v[L]; norm: coef * typical activation "
                                            "norm along v (default: the mode recorded in the vector file)"),
    positions: str = typer.Option("all", "--position", help="all | prompt | response"),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (optional extra; generation and capture)"),
    engine_mode: Optional[str] = engine_mode_option(),
    max_steering_slots: Optional[int] = steering_slots_option(),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model",
                                             callback=positive_int),
) -> None:
    """Answer with a persona vector added at one layer."""
    from ..backends import one_op_layers
    from ..chat import read_chats, user_chat
    from ..generate import generate, over_context

    if (input_path is None) != (output_path is None):
        raise PersonavecError("--input and --output go together")
    if prompt is not None and input_path is not None:
        raise PersonavecError("use either --prompt or --input, not both")
    chat_output(output_path, "--output")
    vector, _ = command_vector(vector_path, trait_name, model)
    records = read_chats(input_path) if input_path else None
    lm, tokenizer = load_engine_model(model, engine, dtype, tensor_parallel_size, trust_remote_code,
                                      **one_op_layers("steer", vector.layer if layer is None else layer))
    layer = vector_layer(vector, lm, layer)
    coef_mode = coef_mode or vector.coef_mode
    handle = vector.apply(lm, layer=layer, coef=coef, positions=positions, coef_mode=coef_mode)
    log(f"steering {vector.trait or 'vector'} at layer {layer}, coef {coef} ({coef_mode})")
    kwargs = dict(max_new_tokens=max_new_tokens, temperature=temperature, batch_size=batch_size)
    with handle:
        if prompt is not None:
            chat = user_chat(prompt, system)
            if over_context(lm, tokenizer, [chat]):
                raise PersonavecError(f"--prompt is longer than the model's context ({lm.context_length} tokens)")
            print(generate(lm, tokenizer, [chat], show_progress=False, **kwargs)[0])
        elif records is not None:
            _answer_file(lm, tokenizer, records, output_path, kwargs,
                         {"trait": vector.trait, "layer": layer, "coef": coef, "coef_mode": coef_mode})
        else:
            _interactive(lm, tokenizer, system, kwargs)


def _answer_file(lm, tokenizer, records, output_path: Path, kwargs: dict, steer_info: dict) -> None:
    """Answer every chat of `--input`; a chat whose prompt is longer than the model's context is not generated
    (it would run far past what the model knows, for minutes): its line keeps only the prompt, with
    `"steering": {..., "skipped": why}`, so output line i still belongs to input line i."""
    from ..datasets_io import write_chats
    from ..generate import generate, over_context

    prompts = [r.prompt for r in records]
    skipped = set(over_context(lm, tokenizer, prompts))
    todo = [i for i in range(len(records)) if i not in skipped]
    answers = dict(zip(todo, generate(lm, tokenizer, [prompts[i] for i in todo], **kwargs))) if todo else {}
    limit = getattr(lm, "context_length", None)
    why = f"prompt longer than the model's context ({limit} tokens)"

    def row(i: int) -> dict:
        r = records[i]
        if i in skipped:
            return {**r.fields, "messages": r.prompt, "steering": {**steer_info, "skipped": why}}
        return {**r.fields, "messages": r.prompt + [{"role": "assistant", "content": answers[i]}],
                "steering": steer_info}

    write_chats(output_path, (row(i) for i in range(len(records))), like=records)
    if skipped:
        where = [records[i].where for i in sorted(skipped)]
        log(f"skipped {len(skipped)} of {len(records)} chats, {why}: {', '.join(where[:10])}"
            + (f" and {len(where) - 10} more" if len(where) > 10 else ""))
    log(f"wrote {len(answers)} answers to {output_path}" + (f" ({len(skipped)} lines without one)" if skipped else ""))


def _interactive(lm, tokenizer, system, kwargs) -> None:
    from ..generate import generate

    messages = [{"role": "system", "content": system}] if system else []
    log("interactive chat; an empty line or Ctrl-D ends it")
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


def export_cmd(
    vector_path: Path = typer.Option(..., "--vector"),
    fmt: str = typer.Option(..., "--format", help="gguf (llama.cpp control vector) | pt (the paper's layout)"),
    out: Path = typer.Option(..., "--out", help="the file to write; its suffix, if .gguf, .pt or .safetensors, must "
                                                "match --format"),
    layer: Optional[int] = typer.Option(None, "--layer", help="gguf: export only this layer (default: all of 2..n)",
                                        callback=non_negative_int),
    position: str = typer.Option("response_avg", "--position"),
) -> None:
    """Convert a vector file for llama.cpp (GGUF) or for the paper's scripts (.pt)."""
    from ..vectors import PersonaVector, llama_cpp_index

    if fmt not in ("gguf", "pt"):
        raise PersonavecError(f"--format {fmt!r}: use gguf or pt")
    suffix = out.suffix.lower()
    if suffix in (".gguf", ".pt", ".safetensors") and suffix != f".{fmt}":
        raise PersonavecError(f"--out {out}: a {suffix} file name for --format {fmt}; name it *.{fmt} (personavec "
                              "reads vector files by their suffix)")
    output_file(out, "--out")
    vector = PersonaVector.load(vector_path)
    if fmt == "gguf":
        vector.export_gguf(out, layers=None if layer is None else [layer], position=position)
        hint = f" (llama.cpp: --control-vector-scaled {out} COEF --control-vector-layer-range {llama_cpp_index(layer)} {llama_cpp_index(layer)})" if layer else ""
        log(f"wrote {out}{hint}")
    else:
        vector.export_pt(out, position=position)
        log(f"wrote {out}")


vectors_app = typer.Typer(no_args_is_help=True, help="Vectors shipped with the package (`--trait NAME` uses them).")


@vectors_app.command("list")
def vectors_list() -> None:
    """Each shipped vector's model and trait, with its layer, pairs kept and file."""
    from rich.table import Table

    from ..shipped import shipped_vectors

    table = Table("model", "trait", "layer", "coef", "pairs kept", "judge scheme", "file")
    for v in shipped_vectors():
        s = v.summary()
        counts = s.get("counts", {})
        table.add_row(v.model, v.trait, str(s.get("layer", "-")), f"{s['coef']:g} ({s['coef_mode']})" if "coef" in s else "-",
                      f"{counts.get('pairs_kept', '-')} of {counts.get('pairs', '-')}", s.get("judge_scheme", "-"),
                      str(v.path))
    console().print(table)


@vectors_app.command("build")
def vectors_build(
    models: str = typer.Option(",".join(BUILD_MODELS), "--models", help="comma-separated packaged short names"),
    traits: str = typer.Option("all", "--traits", help="comma-separated built-in traits, or all"),
    work: Path = typer.Option(Path("runs/vectors"), "--work", help="run folders (resumed when rerun)"),
    dest: Optional[Path] = typer.Option(None, "--dest", help="default: the package's data/vectors folder"),
    force: bool = typer.Option(False, "--force", help="redo runs made with other settings"),
    rebuild: bool = typer.Option(False, "--rebuild", help="also make again the vectors already in --dest with "
                                 "today's settings, judge and weights (kept as they are by default)"),
) -> None:
    """Extract the shipped vectors with the default judge (what `make vectors` runs); resumes where it stopped.

    Vectors already in --dest that were made with today's settings and judge on the packaged weights are kept."""
    from ..shipped import build_shipped_vectors
    from ..traits import list_traits

    names = list_traits() if traits == "all" else [t.strip() for t in traits.split(",") if t.strip()]
    unknown = [t for t in names if t not in list_traits()]
    if unknown:
        raise PersonavecError(f"--traits: unknown trait(s) {', '.join(unknown)}; built-in: {', '.join(list_traits())}")
    from ..models import PACKAGED

    model_names = [m.strip() for m in models.split(",") if m.strip()]
    # Shipped vectors are found by packaged short name: anything else is refused before the judge loads.
    not_packaged = [m for m in model_names if m not in PACKAGED]
    if not model_names or not_packaged:
        raise PersonavecError(f"--models {models!r}: give packaged short names ({', '.join(PACKAGED)})")
    run_folder(work, "--work")
    run_folder(dest, "--dest")
    shipped = build_shipped_vectors(model_names, names, work, dest, force=force, log=log, rebuild=rebuild)
    log(f"shipped {len(shipped)} vector(s)")


def register(app: typer.Typer) -> None:
    app.add_typer(vectors_app, name="vectors")
    app.command("vector")(vector_cmd)
    app.command("steer")(steer_cmd)
    app.command("export")(export_cmd)
