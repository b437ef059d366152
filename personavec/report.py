"""Self-contained HTML reports: PNG plots embedded as base64, plain tables, no external assets."""

from __future__ import annotations

import base64
import html
import io
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # no display; reports are files
import matplotlib.pyplot as plt  # noqa: E402

from .atomic import atomic_write  # noqa: E402

_STYLE = """body{font-family:system-ui,sans-serif;max-width:1000px;margin:2em auto;padding:0 1em;color:#222}
table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;vertical-align:top;text-align:left}
th{background:#f3f3f3}img{max-width:100%}code{background:#f3f3f3;padding:0 3px}.muted{color:#777}"""


def figure_html(fig, alt: str) -> str:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    data = base64.b64encode(buffer.getvalue()).decode()
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{data}">'


def table_html(headers: list[str], rows: list[list]) -> str:
    head = "".join(f"<th>{html.escape(str(h))}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _fmt(value) -> str:
    return f"{value:.3f}" if isinstance(value, float) else str(value)


def number(value: float | None, spec: str = ".3f", missing: str = "n/a") -> str:
    """A score for a report or a log line; None (not computable) prints as `missing`."""
    return missing if value is None else format(value, spec)


def layer_plot(layers: list[int], values: list[float], ylabel: str, title: str, mark: int | None = None):
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot(layers, values, marker="o", ms=3)
    if mark is not None:
        ax.axvline(mark, color="tab:red", ls="--", label=f"chosen layer {mark}")
        ax.legend()
    ax.set_xlabel("layer (0 = embeddings, i = output of block i)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    return fig


def write_report(path: str | Path, title: str, sections: list[tuple[str, str]]) -> Path:
    """`sections` are (heading, inner HTML) pairs, written in order."""
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
             f"<style>{_STYLE}</style></head><body><h1>{html.escape(title)}</h1>"]
    parts += [f"<h2>{html.escape(heading)}</h2>{body}" for heading, body in sections]
    parts.append("</body></html>")
    text = "\n".join(parts)
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
