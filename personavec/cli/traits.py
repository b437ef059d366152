"""`personavec traits ...`: list and show built-in or user trait artifacts, and author new ones."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from personavec.languages import language_codes
from personavec.traits import list_traits, load_trait

from .common import console, output_file, positive_int

traits_app = typer.Typer(help="Built-in and user trait artifacts.", no_args_is_help=True)


@traits_app.command("list")
def list_cmd() -> None:
    """List the built-in traits."""
    table = Table("name", "adjective", "description")
    for name in list_traits():
        t = load_trait(name)
        table.add_row(t.name, t.adjective, t.description)
    console().print(table)  # into a pipe: one whole row per line, for grep


@traits_app.command("show")
def show_cmd(
    trait: str = typer.Argument(..., metavar="NAME|FILE", help="A built-in trait name or a trait JSON file."),
) -> None:
    """Print a trait as JSON (the same format as a trait file)."""
    # Plain print, not rich, so the output is valid JSON that can be piped to a file and edited.
    print(json.dumps(load_trait(trait).to_dict(), indent=2, ensure_ascii=False))


@traits_app.command("new")
def new_cmd(
    name: str = typer.Argument(..., help="The trait's name, e.g. patient (also the default file name)."),
    description: str = typer.Option(..., "--description", "-d", help="One sentence describing the trait."),
    author: str = typer.Option(..., "--author",
                               help="local:<model> | openai:<model> (OPENAI_BASE_URL/OPENAI_API_KEY) | "
                                    "anthropic:<model> (ANTHROPIC_API_KEY)"),
    out: Optional[Path] = typer.Option(None, "--out", help="Trait file to write (default ./NAME.json)."),
    force: bool = typer.Option(False, "--force", help="Overwrite an existing file."),
    attempts: int = typer.Option(3, "--attempts", help="Requests per part before a fallback or an error.",
                                 callback=positive_int),
    seed: int = typer.Option(0, "--seed", help="Base seed for the author's sampling."),
    language: str = typer.Option("en", "--language", metavar="CODE",
                                 help="ISO 639-1 code of the language the artifacts are written in: "
                                      + ", ".join(language_codes()) + " (default en)."),
    dtype: str = typer.Option("auto", "--dtype", help="local authors: auto | bf16 | fp32"),
    trust_remote_code: bool = typer.Option(False, "--trust-remote-code"),
) -> None:
    """Write a new trait file (instructions, 40 questions, rubric) from one sentence, with an author LLM.

    The file is written only once it passes the same checks as `traits show`; edit it freely afterwards.
    With --language the author writes everything in that language and the file records it ("language").
    """
    from personavec.authoring import write_trait

    path = output_file(out if out is not None else Path(f"{name}.json"), "--out")
    trait = write_trait(name, description, author, path, force=force, attempts=attempts, seed=seed,
                        log=lambda m: print(f"personavec: {m}", file=sys.stderr, flush=True), dtype=dtype,
                        trust_remote_code=trust_remote_code, language=language)
    if trait.language == "en":
        what = f"{trait.article} {trait.adjective} assistant"
    else:  # the language's own frame, the system prompt extraction will use
        what = f"{trait.language}: {trait.system_prompt(0, 'pos').removesuffix(trait.instructions[0][0]).strip()}"
    print(f"personavec: wrote {trait.name} ({what})", file=sys.stderr)
    print(path)


def register(app: typer.Typer) -> None:
    """Attach the `traits` sub-command to the main CLI."""
    app.add_typer(traits_app, name="traits")
