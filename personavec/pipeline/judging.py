"""The summary and report of `personavec judge` on a file of chats, written when it keeps a run folder
(`--out`, or `--by`): the trait and coherence score distributions, their correlation with another numeric field
of the lines (`--scores`, e.g. `persona.projection` from monitor's output), and the breakdown by a field."""

from __future__ import annotations

from pathlib import Path

from ..breakdown import group_by, group_keys, report_section
from ..report import figure_html, number, table_html, write_report
from ..vecmath import pearson, spearman
from .project import distribution


def _nan(x):
    return float("nan") if x is None else x


def judge_summary(rows: list[dict], trait: str, scheme: str, scores: list[float] | None = None,
                  scores_field: str | None = None, by: str | None = None, keys: list | None = None) -> dict:
    """`rows` are the written lines (each with `"judge": {"trait_score", "coherence"}`). With `scores` (one number
    per line), the Pearson and Spearman correlation of the trait score with them; with `by`, the breakdown of the
    trait score by that field (`keys`: its value per line, read from the input; default: from `rows`)."""
    trait_scores = [r["judge"]["trait_score"] for r in rows]
    summary = {"trait": trait, "scheme": scheme, "n": len(rows),
               "unscored": sum(s is None for s in trait_scores),
               "skipped": sum("skipped" in r["judge"] for r in rows),
               "trait_score": distribution([_nan(s) for s in trait_scores]),
               "coherence": distribution([_nan(r["judge"]["coherence"]) for r in rows])}
    if scores is not None:
        pairs = [(t, s) for t, s in zip(trait_scores, scores) if t is not None]
        summary["correlation"] = {"scores": scores_field, "n": len(pairs),
                                  "pearson": pearson([t for t, _ in pairs], [s for _, s in pairs]),
                                  "spearman": spearman([t for t, _ in pairs], [s for _, s in pairs])}
    if by is not None:
        summary["by"] = group_by(trait_scores, group_keys(rows, by) if keys is None else keys, scores=scores,
                                 field=by, measure="trait_score", scores_field=scores_field if scores else None)
    return summary


def write_judge_report(path: str | Path, title: str, rows: list[dict], summary: dict,
                       scores: list[float] | None = None, keys: list | None = None) -> Path:
    import matplotlib.pyplot as plt

    trait_scores = [r["judge"]["trait_score"] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 3))
    ax.hist([s for s in trait_scores if s is not None], bins=20, range=(0, 100), color="tab:blue", alpha=0.8)
    ax.set_xlabel(f"{summary['trait']} score ({summary['scheme']})")
    ax.set_ylabel("answers")
    sections = [("Trait scores", figure_html(fig, "histogram of trait scores") + table_html(
        ["score", *summary["trait_score"]], [["trait", *summary["trait_score"].values()],
                                             ["coherence", *summary["coherence"].values()]]))]
    if "by" in summary:
        sections.append(report_section(summary["by"], trait_scores,
                                       keys if keys is not None else group_keys(rows, summary["by"]["field"])))
    if scores is not None:
        c = summary["correlation"]
        fig, ax = plt.subplots(figsize=(5, 4))
        pairs = [(s, t) for t, s in zip(trait_scores, scores) if t is not None]
        ax.scatter([s for s, _ in pairs], [t for _, t in pairs], s=12, alpha=0.7)
        ax.set_xlabel(c["scores"])
        ax.set_ylabel("trait score")
        ax.set_title(f"Pearson r {number(c['pearson'])}, Spearman ρ {number(c['spearman'])} (n {c['n']})")
        sections.append((f"Trait score vs {c['scores']}", figure_html(fig, "scatter of trait score against scores")))
    return write_report(path, title, sections)
