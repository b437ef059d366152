"""`personavec traits ...`: list and show built-in or user trait artifacts."""

from __future__ import annotations

import json

import typer
from rich.console import Console
from rich.table import Table

from personavec.traits import list_traits, load_trait

traits_app = typer.Typer(help="Built-in and user trait artifacts.", no_args_is_help=True)


@traits_app.command("list")
def list_cmd() -> None:
    """List the built-in traits."""
    table = Table("name", "adjective", "description")
    for name in list_traits():
        t = load_trait(name)
        table.add_row(t.name, t.adjective, t.description)
    console = Console()
    if not console.is_terminal:
        # Pipes and test runners report 80 columns; a wide page keeps each row on one line for grep.
        console = Console(width=200)
    console.print(table)


@traits_app.command("show")
def show_cmd(
    trait: str = typer.Argument(..., metavar="NAME|FILE", help="A built-in trait name or a trait JSON file."),
) -> None:
    """Print a trait as JSON (the same format as a trait file)."""
    # Plain print, not rich, so the output is valid JSON that can be piped to a file and edited.
    print(json.dumps(load_trait(trait).to_dict(), indent=2, ensure_ascii=False))


def register(app: typer.Typer) -> None:
    """Attach the `traits` sub-command to the main CLI."""
    app.add_typer(traits_app, name="traits")
