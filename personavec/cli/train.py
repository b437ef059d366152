"""`personavec finetune` and `personavec gate`: a thin layer over personavec.pipeline.finetune and .gate."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Optional

import typer

from ..pipeline.finetune import DEFAULT_TARGETS
from .common import (finite_float, fraction, log, non_negative_float, non_negative_int, positive_float,
                     positive_int, run_folder)


def finetune_cmd(
    model: str = typer.Option(..., "--model", help="packaged short name, hub id or local folder"),
    data: Path = typer.Option(..., "--data", help="chat JSONL; the loss is on each chat's final assistant message"),
    out: Path = typer.Option(..., "--out", help="run folder; the adapter goes to OUT/adapter"),
    rank: int = typer.Option(16, "--rank", help="LoRA rank", callback=positive_int),
    alpha: int = typer.Option(32, "--alpha", help="LoRA alpha (scale = alpha / rank)", callback=positive_int),
    dropout: float = typer.Option(0.0, "--dropout", help="LoRA dropout", callback=fraction),
    # The default is in the help text, with spaces: typer cannot wrap the comma-joined list and cut it off.
    target_modules: str = typer.Option(DEFAULT_TARGETS, "--target-modules", show_default=False,
                                       help="comma-separated module names, or all-linear (default: "
                                            + ", ".join(DEFAULT_TARGETS.split(",")) + ")"),
    learning_rate: float = typer.Option(2e-4, "--learning-rate", "--lr", callback=positive_float),
    epochs: int = typer.Option(1, "--epochs", callback=positive_int),
    batch_size: int = typer.Option(4, "--batch-size", callback=positive_int),
    grad_accum: int = typer.Option(2, "--grad-accum", help="micro-batches per optimiser step", callback=positive_int),
    max_length: int = typer.Option(512, "--max-length", help="skip chats with more tokens", callback=positive_int),
    warmup_steps: int = typer.Option(5, "--warmup-steps", callback=non_negative_int),
    seed: int = typer.Option(0, "--seed"),
    checkpoint_every: int = typer.Option(20, "--checkpoint-every", help="optimiser steps between checkpoints",
                                         callback=positive_int),
    steer: Optional[Path] = typer.Option(None, "--steer", help="preventative steering: vector added during training"),
    ablate: Optional[Path] = typer.Option(None, "--ablate", help="CAFT: direction projected out during training"),
    layer: Optional[int] = typer.Option(None, "--layer", help="layer to steer/ablate (default: the vector file's)",
                                        callback=non_negative_int),
    coef: Optional[float] = typer.Option(None, "--coef", help="steering coefficient (with --steer)",
                                         callback=finite_float),
    coef_mode: Optional[str] = typer.Option(None, "--coef-mode", help="raw | norm (default: the vector file's)"),
    steer_layers: str = typer.Option("one", "--steer-layers", help="one | all (layer-incremental vectors, raw coef)"),
    dtype: str = typer.Option("auto", "--dtype", help="auto (bf16 where supported) | bf16 | fp32"),
    force: bool = typer.Option(False, "--force", help="overwrite a folder that holds a different run"),
) -> None:
    """LoRA fine-tuning, optionally with preventative steering (--steer) or CAFT (--ablate)."""
    from ..chat import read_chats
    from ..models import load_model
    from ..pipeline.finetune import FinetuneConfig, run_finetune
    from ..vectors import PersonaVector

    cfg = FinetuneConfig(model=model, data=str(data), rank=rank, alpha=alpha, dropout=dropout,
                         target_modules=target_modules, learning_rate=learning_rate, epochs=epochs,
                         batch_size=batch_size, grad_accum=grad_accum, max_length=max_length,
                         warmup_steps=warmup_steps, seed=seed, checkpoint_every=checkpoint_every, dtype=dtype,
                         steer=str(steer) if steer else None, ablate=str(ablate) if ablate else None, layer=layer,
                         coef=coef, coef_mode=coef_mode, steer_layers=steer_layers)
    cfg.check()  # flag errors before any file or model is read
    run_folder(out, "--out")
    records = read_chats(data, require_response=True)
    vector = PersonaVector.load(steer or ablate) if (steer or ablate) else None
    lm, tokenizer = load_model(model, dtype=dtype)
    result = run_finetune(cfg, records, lm, tokenizer, out, vector=vector, force=force)
    s = result.summary
    log(f"trained {s['steps']} steps on {s['examples']} chats: loss {s['first_loss']:.3f} -> {s['final_loss']:.3f} "
        f"({s['tokens_per_second']:.0f} tokens/s)")
    print(f"adapter: {result.adapter}\nreport: {result.out / 'report.html'}")


def gate_cmd(
    base: str = typer.Option(..., "--base", help="the released model"),
    candidate: str = typer.Option(..., "--candidate", help="full model folder/id, or a peft adapter folder on --base"),
    traits: str = typer.Option(..., "--traits", help="comma-separated trait names"),
    vectors: Path = typer.Option(..., "--vectors", help="folder with TRAIT.safetensors (or extract-TRAIT/ runs)"),
    max_shift: Optional[float] = typer.Option(None, "--max-shift",
                                              help="limit on shift / vector length at the vector's layer, e.g. 0.1",
                                              callback=non_negative_float),
    judge_spec: str = typer.Option("none", "--judge", help="local:MODEL | openai:MODEL | none"),
    max_score_increase: Optional[float] = typer.Option(None, "--max-score-increase",
                                                       help="limit on the judged trait score's rise (points)",
                                                       callback=finite_float),
    questions: Optional[int] = typer.Option(None, "--questions", help="first N evaluation questions per trait",
                                            callback=positive_int),
    out: Path = typer.Option(Path("runs/gate"), "--out", help="run folder (report.html, gate.json)"),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Fail (exit 1) when a candidate's persona moved past a limit; one line per failing trait."""
    from ..judge import make_judge
    from ..models import load_model
    from ..pipeline.gate import GateLimits, run_gate
    from ..pipeline.shift import attach_adapter, is_adapter

    limits = GateLimits(max_shift=max_shift, max_score_increase=max_score_increase)
    limits.check(judge_spec != "none")
    run_folder(out, "--out")
    names = [t.strip() for t in traits.split(",") if t.strip()]
    judge = make_judge(judge_spec)
    base_model, tokenizer = load_model(base, dtype=dtype)
    if is_adapter(candidate):
        candidate_model = attach_adapter(load_model(base, dtype=dtype)[0], candidate, base)
    else:
        candidate_model, _ = load_model(candidate, dtype=dtype)
    verdict = run_gate(base, candidate, names, vectors, limits, base_model, candidate_model, tokenizer, judge,
                       judge_spec, out, questions=questions, batch_size=batch_size, force=force)
    for r in verdict["traits"]:
        change = "" if r["trait_score_change"] is None else f", judged score {r['trait_score_change']:+.1f}"
        log(f"  {'pass' if r['passed'] else 'FAIL'}  {r['trait']}: shift {r['relative_shift']:+.3f} of the vector's "
            f"length at layer {r['layer']}{change}")
    print(f"report: {Path(out) / 'report.html'}")
    if not verdict["passed"]:
        for reason in verdict["failures"]:
            print(f"gate failed: {reason}", file=sys.stderr)
        raise typer.Exit(1)
    log("gate passed")


def register(app: typer.Typer) -> None:
    app.command("finetune")(finetune_cmd)
    app.command("gate")(gate_cmd)

