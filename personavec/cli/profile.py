"""A model's persona at a glance: `personavec profile`."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from ..errors import PersonavecError
from .common import log, positive_int, print_breakdown, run_folder


def profile_cmd(
    model: str = typer.Option(..., "--model"),
    traits_arg: str = typer.Option("all", "--traits", help="comma-separated traits, or all (every vector in --vectors)"),
    vectors: Optional[Path] = typer.Option(None, "--vectors", help="folder of vectors: TRAIT.safetensors, "
                                           "TRAIT/vectors.safetensors or extract-TRAIT/vectors.safetensors "
                                           "(default: the vectors shipped for --model)"),
    compare: Optional[str] = typer.Option(None, "--compare", help="a second model, or a peft adapter over --model"),
    judge_spec: str = typer.Option("none", "--judge", help="local:MODEL | openai:MODEL | none"),
    out: Path = typer.Option(..., "--out", help="run folder"),
    questions: Optional[int] = typer.Option(None, "--questions", callback=positive_int,
                                            help="the first N evaluation questions per trait (default: all)"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", callback=positive_int),
    batch_size: int = typer.Option(16, "--batch-size", callback=positive_int),
    bootstrap: int = typer.Option(2000, "--bootstrap", callback=positive_int, help="bootstrap resamples"),
    steer: Optional[str] = typer.Option(None, "--steer", help="cross-trait effects: steer each of these traits (a,b "
                                        "or all) at its recommended coefficient and read every trait"),
    by: Optional[str] = typer.Option(None, "--by", help="break each trait's readings down by model (--model and "
                                     "--compare) or question: count, mean, sd, 95% CI, r with --judge"),
    dtype: str = typer.Option("auto", "--dtype"),
    force: bool = typer.Option(False, "--force"),
) -> None:
    """Every trait's reading on the model's own answers, with bootstrap intervals; `--compare` a second model."""
    from ..judge import make_judge
    from ..models import load_model
    from ..pipeline.gate import find_vector
    from ..pipeline.profile import ProfileConfig, check_profile_by, run_profile
    from ..pipeline.shift import attach_adapter, is_adapter
    from ..traits import list_traits, load_trait
    from ..vectors import PersonaVector

    check_profile_by(by)
    run_folder(out, "--out")
    shipped = vectors is None
    if shipped:
        from ..shipped import shipped_root, shipped_vectors

        vectors = shipped_root() / model
        if not vectors.is_dir():
            models = sorted({v.model for v in shipped_vectors()})
            raise PersonavecError(f"--model {model}: no vectors ship for it (shipped for: {', '.join(models) or 'none'}); "
                                  "pass --vectors DIR")
    if not vectors.is_dir():
        raise PersonavecError(f"--vectors {vectors}: not a folder")
    names = list_traits() if traits_arg == "all" else [t.strip() for t in traits_arg.split(",") if t.strip()]
    if traits_arg == "all":
        names = [n for n in names if any((vectors / p).is_file() for p in
                                         (f"{n}.safetensors", f"{n}/vectors.safetensors", f"extract-{n}/vectors.safetensors"))]
        if not names:
            raise PersonavecError(f"--vectors {vectors}: holds no vector for any built-in trait")
    traits = {}
    for name in names:
        trait = load_trait(name)
        vector = PersonaVector.load(find_vector(vectors, trait.name))
        if shipped:
            from ..shipped import check_shipped

            check_shipped(vector, model, trait.name)
        traits[trait.name] = (trait, vector)
    cfg = ProfileConfig(model=model, traits=list(traits), vectors=str(vectors), compare=compare, judge=judge_spec,
                        questions=questions, max_new_tokens=max_new_tokens, batch_size=batch_size, bootstrap=bootstrap)
    lm, tokenizer = load_model(model, dtype=dtype)
    second = None
    if compare:
        if is_adapter(compare):
            base, _ = load_model(model, dtype=dtype)  # a fresh copy: the adapter attaches in place
            second = attach_adapter(base, compare, model)
        else:
            second, second_tokenizer = load_model(compare, dtype=dtype)
            if second_tokenizer.get_vocab() != tokenizer.get_vocab():
                raise PersonavecError(f"--compare {compare}: another tokenizer than --model {model}'s; a profile "
                                      "compares checkpoints of one model family")
    steered = None
    if steer:
        steered = list(traits) if steer == "all" else [t.strip() for t in steer.split(",") if t.strip()]
        missing = [t for t in steered if t not in traits]
        if missing:
            raise PersonavecError(f"--steer: {missing[0]!r} is not among the profiled traits ({', '.join(traits)})")
        cfg.extra["steer"] = steered
    summary = run_profile(cfg, traits, lm, tokenizer, out, judge=make_judge(judge_spec), second=second, force=force,
                          steer=steered, by=by)
    for name, t in summary["traits"].items():
        main = t.get("response_scaled") or t.get("response")
        line = f"{name}: response {main['mean']:.3f} [{main['ci'][0]:.3f}, {main['ci'][1]:.3f}]"
        if compare:
            line += f", difference {t['difference']:+.3f}" + (" (interval excludes 0)" if t["significant"] else "")
        log(line)
    if by:
        print_breakdown(summary["by"], f"readings by {by}")
    print(f"report: {out / 'report.html'}")


def register(app: typer.Typer) -> None:
    app.command("profile")(profile_cmd)
