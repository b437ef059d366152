"""Breakdowns by a field (`--by FIELD`): one measure per line, grouped by the value of a field of the line.

Pure functions, no model involved:

- :func:`field_value` reads a dotted path (`meta.source`) out of a line;
- :func:`group_keys` reads it out of every line, refusing (one line, naming the file and line) the first that has
  no such field or holds an object or a list there;
- :func:`group_by` computes, per group, the count, mean, sd and a 95% interval of the mean, and, where given, the
  AUROC of the measure against 0/1 labels or its correlation with other scores;
- :func:`report_section` and :func:`breakdown_rows` draw it for report.html and for the tables the CLI prints.

The result's shape is stable (see docs/breakdowns.md)::

    {"field": F, "measure": M, "groups": [{"value", "count", "scored", "mean", "sd", "ci",
                                           ["auroc", "positives", "negatives"], ["pearson", "spearman", "pairs"]}],
     "all": {... the same over every line, without "value"}}
"""

from __future__ import annotations

import math
import textwrap
from typing import Callable, Sequence

import torch

from .errors import PersonavecError, arg
from .vecmath import auroc, bootstrap_mean_ci, pearson, spearman

# Above this many values a group's interval is the normal approximation (mean ± 1.96 sd / √n): a 2000-resample
# bootstrap of a group of a million lines would hold 2e9 indices, and at that size both intervals agree.
BOOTSTRAP_LIMIT = 5000

_MISSING = object()


def field_value(record, path: str):
    """The value at a dotted `path` of a line (a dict, or a ChatRecord: its fields and `messages`).

    Each part of the path is a key of an object; lists are not indexed. Raises KeyError naming the first part
    that is not there (or that sits under something other than an object).
    """
    value = record.to_json() if hasattr(record, "to_json") else record
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise KeyError(part)
        value = value[part]
    return value


def _kind(value) -> str | None:
    """The kind a group value is keyed by; None for a value that cannot be a group (an object or a list)."""
    if value is None:
        return "null"
    if isinstance(value, bool):  # before numbers: true is not the group 1
        return "bool"
    if isinstance(value, (int, float)):
        return "number"
    if isinstance(value, str):
        return "text"
    return None


def group_keys(records: Sequence, path: str, where: Callable[[int], str] | None = None, flag: str = "by") -> list:
    """The value of `path` on every line, in order, for :func:`group_by`.

    `records` are ChatRecords (their `where` names file and line) or dicts (`where(i)` names line i, else
    "line i+1"). A line without the field, or holding an object or a list there, is a one-line error naming the
    parameter (`flag`), the field and the first such line. An explicit null is a value like any other: it forms
    its own group (JSON `null`); a missing field is never grouped.
    """
    if not path or any(not part for part in path.split(".")):
        raise PersonavecError(f"{arg(flag, repr(path))}: give a field name or a dotted path such as meta.source")
    keys = []
    for i, record in enumerate(records):
        here = getattr(record, "where", "") or (where(i) if where else f"line {i + 1}")
        try:
            value = field_value(record, path)
        except KeyError:
            raise PersonavecError(f"{arg(flag, path)}: {here} has no field {path!r}") from None
        kind = _kind(value)
        if kind is None:
            what = "an object" if isinstance(value, dict) else "a list"
            raise PersonavecError(f"{arg(flag, path)}: {here}: field {path!r} holds {what}; group by a text, number, "
                                  "true/false or null field (a dotted path reaches inside an object)")
        if kind == "number" and not math.isfinite(value):
            raise PersonavecError(f"{arg(flag, path)}: {here}: field {path!r} is {value}; group by a finite value")
        keys.append(value)
    return keys


def _key(value) -> tuple:
    """Groups are equal JSON values: 1 and 1.0 are one group, true and 1 two, "1" and 1 two."""
    kind = _kind(value)
    return (kind, float(value)) if kind == "number" else (kind, value)


# Group order: numbers ascending, then text, then false/true, then null; stable whatever the file order.
_ORDER = {"number": 0, "text": 1, "bool": 2, "null": 3}


def _present(x) -> bool:
    return x is not None and not (isinstance(x, float) and math.isnan(x))


def _stats(values: list, labels: list | None, scores: list | None, bootstrap: int, seed: int) -> dict:
    kept = [i for i, v in enumerate(values) if _present(v)]
    x = torch.tensor([float(values[i]) for i in kept], dtype=torch.float64)
    entry: dict = {"count": len(values), "scored": len(kept), "mean": None, "sd": None, "ci": None}
    if len(kept):
        entry["mean"] = float(x.mean())
    if len(kept) > 1:
        sd = float(x.std())  # sample sd (n - 1)
        entry["sd"] = sd
        if len(kept) <= BOOTSTRAP_LIMIT:
            entry["ci"] = list(bootstrap_mean_ci(x, n=bootstrap, seed=seed))
        else:
            half = 1.959964 * sd / math.sqrt(len(kept))
            entry["ci"] = [entry["mean"] - half, entry["mean"] + half]
    if labels is not None:
        pairs = [(int(labels[i]), float(values[i])) for i in kept if labels[i] is not None]
        entry["positives"] = sum(y for y, _ in pairs)
        entry["negatives"] = len(pairs) - entry["positives"]
        entry["auroc"] = auroc([y for y, _ in pairs], [v for _, v in pairs]) if pairs else None
    if scores is not None:
        pairs = [(float(values[i]), float(scores[i])) for i in kept if _present(scores[i])]
        entry["pairs"] = len(pairs)
        entry["pearson"] = pearson([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
        entry["spearman"] = spearman([a for a, _ in pairs], [b for _, b in pairs]) if pairs else None
    return entry


def group_by(values: Sequence, keys: Sequence, labels: Sequence | None = None, scores: Sequence | None = None, *,
             field: str | None = None, measure: str | None = None, labels_field: str | None = None,
             scores_field: str | None = None, bootstrap: int = 2000, seed: int = 0) -> dict:
    """Per-group statistics of `values` (one per line; None or nan where a line has no value: it counts in
    `count`, not in `scored`), grouped by `keys` (from :func:`group_keys`).

    Per group: `count` lines, `scored` of them with a value, `mean`, `sd` (sample sd; None below 2 values) and
    `ci`, the 95% interval of the mean (percentile bootstrap, `bootstrap` resamples with `seed`, up to
    BOOTSTRAP_LIMIT values; the normal approximation above; None below 2 values). With `labels` (0/1 per line,
    None where unknown): `auroc` of the values against them (None when the group lacks a class), `positives`,
    `negatives`. With `scores` (a number per line, None where missing): `pearson` and `spearman` of the values
    with them over the `pairs` lines that have both. `all` is the same over every line.
    """
    n = len(values)
    for name, other in (("keys", keys), ("labels", labels), ("scores", scores)):
        if other is not None and len(other) != n:
            raise PersonavecError(f"{arg(name)} has {len(other)} entries for {n} values; give one per line")
    if labels is not None:
        bad = next((y for y in labels if y is not None and (isinstance(y, bool) or y not in (0, 1))), _MISSING)
        if bad is not _MISSING:
            raise PersonavecError(f"{arg('labels')}: {bad!r} is not 0 or 1")
    members: dict[tuple, list[int]] = {}
    first: dict[tuple, object] = {}
    for i, k in enumerate(keys):
        if _kind(k) is None:
            raise PersonavecError(f"{arg('keys')}: entry {i} is {type(k).__name__}; use group_keys to read them")
        key = _key(k)
        members.setdefault(key, []).append(i)
        first.setdefault(key, k)
    ordered = sorted(members, key=lambda key: (_ORDER[key[0]], key[1] if key[0] != "null" else 0))

    def pick(seq, idx):
        return None if seq is None else [seq[i] for i in idx]

    groups = [{"value": first[key], **_stats(pick(values, members[key]), pick(labels, members[key]),
                                             pick(scores, members[key]), bootstrap, seed)} for key in ordered]
    out = {"field": field, "measure": measure}
    if labels_field is not None:
        out["labels"] = labels_field
    if scores_field is not None:
        out["scores"] = scores_field
    out["groups"] = groups
    out["all"] = _stats(list(values), None if labels is None else list(labels),
                        None if scores is None else list(scores), bootstrap, seed)
    return out


# -- drawing: table rows, report section ------------------------------------------------------------------------

def value_text(value) -> str:
    """A group value as a table shows it: text as is, numbers in short form, JSON spelling for true/false/null."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return format(value, "g")
    return str(value) if value != "" else '""'  # an empty text is a value too


def _num(x, spec: str = ".3f") -> str:
    return "-" if x is None else format(x, spec)


def breakdown_rows(breakdown: dict, with_all: bool = True) -> tuple[list[str], list[list[str]]]:
    """(headers, rows of text) of a breakdown: one row per group (and `all`), the columns it has."""
    groups = breakdown["groups"]
    traited = any("trait" in g for g in groups)
    has_auroc = any("auroc" in g for g in groups)
    has_corr = any("pearson" in g for g in groups)
    headers = (["trait"] if traited else []) + [breakdown.get("field") or "group", "count", "scored", "mean", "sd",
                                                "95% CI"]
    if has_auroc:
        headers += [f"AUROC vs {breakdown.get('labels') or 'labels'}", "pos/neg"]
    if has_corr:
        headers += [f"r vs {breakdown.get('scores') or 'scores'}", "ρ"]

    def row(g, name):
        cells = ([g.get("trait", "")] if traited else []) + [
            name, str(g["count"]), str(g["scored"]), _num(g["mean"]), _num(g["sd"]),
            "-" if g["ci"] is None else f"[{g['ci'][0]:.3f}, {g['ci'][1]:.3f}]"]
        if has_auroc:
            cells += [_num(g.get("auroc")), f"{g.get('positives', 0)}/{g.get('negatives', 0)}"]
        if has_corr:
            cells += [_num(g.get("pearson"), "+.3f"), _num(g.get("spearman"), "+.3f")]
        return cells

    rows = [row(g, value_text(g["value"])) for g in groups]
    if with_all and "all" in breakdown:
        rows.append(row({**breakdown["all"], "trait": ""}, "(all)"))
    return headers, rows


# The plot shows at most this many groups (the largest); the table and summary.json have them all.
PLOT_GROUPS = 30


def breakdown_figure(breakdown: dict, values: Sequence | None = None, keys: Sequence | None = None):
    """Horizontal bars of each group's mean with its 95% interval, the lines' values as dots over them (given
    `values` and `keys`), and a second panel with each group's AUROC or correlation where the breakdown has one."""
    import matplotlib.pyplot as plt

    groups = breakdown["groups"]
    if len(groups) > PLOT_GROUPS:
        groups = sorted(sorted(groups, key=lambda g: -g["count"])[:PLOT_GROUPS], key=groups.index)
    # long values wrap onto several tick-label lines rather than being cut
    names = [textwrap.fill((f"{g['trait']}: " if "trait" in g else "") + value_text(g["value"]), 40) for g in groups]
    second = "auroc" if any(g.get("auroc") is not None for g in groups) else \
        "pearson" if any(g.get("pearson") is not None for g in groups) else None
    height = 0.3 * sum(name.count("\n") + 1 for name in names) + 1.4
    fig, axes = plt.subplots(1, 2 if second else 1, figsize=(10 if second else 7, height), squeeze=False,
                             sharey=True, gridspec_kw={"width_ratios": [2, 1]} if second else None)
    ax = axes[0][0]
    ys = list(range(len(groups)))[::-1]  # first group on top
    means = [g["mean"] if g["mean"] is not None else math.nan for g in groups]
    low = [g["mean"] - g["ci"][0] if g["ci"] else 0.0 for g in groups]
    high = [g["ci"][1] - g["mean"] if g["ci"] else 0.0 for g in groups]
    ax.barh(ys, means, color="tab:blue", alpha=0.45, label="mean")
    # the intervals above the dots, so many lines do not hide them
    ax.errorbar(means, ys, xerr=[low, high], fmt="none", ecolor="tab:red", capsize=4, lw=1.5, zorder=4,
                label="95% CI")
    if values is not None and keys is not None and not any("trait" in g for g in groups):
        position = {_key(g["value"]): y for g, y in zip(groups, ys)}
        dots = [(v, position.get(_key(k))) for v, k in zip(values, keys) if _present(v)]
        dots = [(v, y) for v, y in dots if y is not None]
        ax.scatter([v for v, _ in dots], [y for _, y in dots], s=8, color="k", alpha=0.4, zorder=3, label="lines")
    ax.set_yticks(ys, names)
    ax.set_xlabel(breakdown.get("measure") or "value")
    ax.axvline(0, color="#999", lw=0.8)
    ax.legend(fontsize=8, loc="best")
    ax.grid(axis="x", alpha=0.3)
    if second:
        right = axes[0][1]
        data = [g.get(second) if g.get(second) is not None else math.nan for g in groups]
        right.barh(ys, data, color="tab:red" if second == "auroc" else "tab:green", alpha=0.6)
        if second == "auroc":
            right.axvline(0.5, color="k", ls="--", lw=1)
            right.set_xlim(0, 1)
            right.set_xlabel(f"AUROC against {breakdown.get('labels') or 'labels'}")
        else:
            right.axvline(0, color="k", lw=0.8)
            right.set_xlim(-1, 1)
            right.set_xlabel(f"Pearson r with {breakdown.get('scores') or 'scores'}")
        right.grid(axis="x", alpha=0.3)
    return fig


def report_section(breakdown: dict, values: Sequence | None = None, keys: Sequence | None = None) -> tuple[str, str]:
    """(heading, HTML) for report.html: the grouped plot and the full table."""
    from .report import figure_html, table_html

    headers, rows = breakdown_rows(breakdown)
    measure = breakdown.get("measure") or "value"
    note = "" if len(breakdown["groups"]) <= PLOT_GROUPS else \
        f"<p class='muted'>The plot shows the {PLOT_GROUPS} largest of {len(breakdown['groups'])} groups.</p>"
    return (f"{measure} by {breakdown.get('field')}",
            figure_html(breakdown_figure(breakdown, values, keys), f"{measure} by {breakdown.get('field')}")
            + note + table_html(headers, rows))
