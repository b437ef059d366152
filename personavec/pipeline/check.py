"""Does a vector recognise its trait in labelled text it was not made from? AUROC of the screening readings per layer.

A check file is chat JSONL with a `label` field on every line (1 = shows the trait, 0 = does not) and a final
assistant answer. For each layer L, with v̂ = unit(v[L]):

- `response_projection`: mean over the answer's tokens of h_L · v̂ (what `screen` reports under that name);
- `approx_projection_difference`: that minus the last prompt token's h_L · v̂ (`screen --approx`).

The AUROC says how often a label-1 answer scores above a label-0 one. One capture at every layer serves every
vector, so the benchmark (`benchmarks/bench_generalisation.py`) scores many vectors on one pass, and
`extract --check FILE` adds the table for the vector it just made.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..activations import capture
from ..chat import ChatRecord, read_chats
from ..errors import PersonavecError
from ..vecmath import auroc, mean_difference, project

LABEL_FIELD = "label"
READINGS = ("response_projection", "approx_projection_difference")


def check_labelled(name: str, records: list[ChatRecord], field: str = LABEL_FIELD, flag: str = "--check") -> list[int]:
    """The 0/1 labels of a check file; a one-line error naming the file (and line) for anything a check cannot use."""
    labels = []
    for record in records:
        if not record.has_response or not record.response.strip():
            raise PersonavecError(f"{record.where}: the chat has no non-empty final assistant message ({flag} reads "
                                  "the answer)")
        value = record.fields.get(field)
        if value is None:
            raise PersonavecError(f"{record.where}: no {field!r} field ({flag} files need \"{field}\": 1 for an answer "
                                  "that shows the trait, 0 for one that does not)")
        if isinstance(value, bool) or value not in (0, 1):
            raise PersonavecError(f"{record.where}: {field!r} is {value!r}; it must be 0 or 1")
        labels.append(int(value))
    classes = set(labels)
    if classes != {0, 1}:
        only = classes.pop()
        raise PersonavecError(f"{flag} {name}: every chat has {field} {only}; an AUROC needs both classes "
                              f"({field} 0 and {field} 1)")
    return labels


def read_check_files(paths, field: str = LABEL_FIELD, flag: str = "--check") -> dict[str, tuple[list[ChatRecord], list[int]]]:
    """Read and validate every check file up front (before any model work): `{path as given: (records, labels)}`."""
    out = {}
    for path in paths or []:
        name = str(path)
        if name in out:
            continue  # the same file twice is one check
        if not Path(path).exists():
            raise PersonavecError(f"{flag} {name}: no such file")
        if Path(path).is_dir():
            raise PersonavecError(f"{flag} {name}: is a folder; give a labelled chat JSONL file")
        records = read_chats(path)
        out[name] = (records, check_labelled(name, records, field, flag))
    return out


def capture_for_check(model, tokenizer, records: list[ChatRecord], batch_size: int = 16, max_length: int | None = None,
                      show_progress: bool = False):
    """The one capture a check needs: response mean and last prompt token at every layer."""
    return capture(model, tokenizer, [r.messages for r in records], positions=("response_avg", "prompt_last"),
                   batch_size=batch_size, max_length=max_length, show_progress=show_progress)


def readings_by_layer(acts, vectors: torch.Tensor) -> dict[str, torch.Tensor]:
    """`[n_chats, n_layers + 1]` readings of captured chats on each layer's own row of `vectors` (skipped rows dropped)."""
    acts = acts.kept()
    if acts.layers != list(range(vectors.shape[0])):
        raise PersonavecError(f"the capture covers layers {acts.layers[0]}..{acts.layers[-1]}, the vector "
                              f"{vectors.shape[0]} layers; capture every layer for a check")
    response = torch.stack([project(acts.response_avg[:, i], vectors[i]) for i in range(vectors.shape[0])], 1)
    last = torch.stack([project(acts.prompt_last[:, i], vectors[i]) for i in range(vectors.shape[0])], 1)
    return {"response_projection": response, "approx_projection_difference": response - last}


def aurocs_by_layer(acts, labels: list[int], vectors: torch.Tensor) -> dict[str, list[float | None]]:
    """AUROC of each reading at every layer (None where the vector's row is zero: no direction there)."""
    skipped = set(acts.skipped)
    kept_labels = [y for i, y in enumerate(labels) if i not in skipped]
    readings = readings_by_layer(acts, vectors)
    zero = vectors.norm(dim=-1) == 0
    return {name: [None if zero[layer] else auroc(kept_labels, values[:, layer]) for layer in range(vectors.shape[0])]
            for name, values in readings.items()}


def split_half_ceiling(acts, labels: list[int], groups: list[str]) -> list[float | None]:
    """An oracle for a test set: at each layer, the mean difference of the label-1 and label-0 response means of
    half the groups (every other group id, sorted), scored as the response projection on the other half; the two
    folds' AUROCs averaged. Says what a direction found *inside* that register reaches on unseen pairs of it, so a
    vector's AUROC can be read against it. Rows of the same group (the two answers of a pair) stay on one side."""
    skipped = set(acts.skipped)
    kept = [i for i in range(len(labels)) if i not in skipped]
    x = acts.kept().response_avg.float()
    y = torch.tensor([labels[i] for i in kept], dtype=torch.bool)
    names = sorted({groups[i] for i in kept})
    first = set(names[::2])
    fold = torch.tensor([groups[i] in first for i in kept], dtype=torch.bool)
    out: list[float | None] = []
    for layer in range(x.shape[1]):
        values = []
        for train in (fold, ~fold):
            test = ~train
            if not (train & y).any() or not (train & ~y).any():
                continue
            direction = mean_difference(x[train & y, layer], x[train & ~y, layer])
            if direction.norm() == 0:
                continue
            value = auroc(y[test].tolist(), project(x[test, layer], direction))
            if value is not None:
                values.append(value)
        out.append(sum(values) / len(values) if values else None)
    return out


def best_layer(values: list[float | None], layers: list[int] | None = None) -> tuple[int | None, float | None]:
    """The layer (among `layers`, default all but the embeddings) with the highest AUROC, and that AUROC."""
    candidates = [layer for layer in (layers if layers is not None else range(1, len(values))) if values[layer] is not None]
    if not candidates:
        return None, None
    layer = max(candidates, key=lambda i: values[i])
    return layer, values[layer]


def check_summary(acts, labels: list[int], vectors: torch.Tensor, layer: int) -> dict:
    """The `checks` entry of one file: counts, AUROC at `layer`, the best layer, and both readings at every layer."""
    by_layer = aurocs_by_layer(acts, labels, vectors)
    skipped = set(acts.skipped)
    kept = [y for i, y in enumerate(labels) if i not in skipped]
    entry = {"n": len(kept), "n_label_1": sum(kept), "n_label_0": len(kept) - sum(kept), "skipped": len(skipped),
             "layer": layer}
    for name in READINGS:
        best, value = best_layer(by_layer[name])
        entry[name] = {"auroc": by_layer[name][layer], "best_layer": best, "best_auroc": value}
    entry["by_layer"] = by_layer
    return entry


def run_checks(model, tokenizer, vector, checks: dict[str, tuple[list[ChatRecord], list[int]]], layer: int,
               batch_size: int = 16) -> dict[str, dict]:
    """`check_summary` for every file of `read_check_files`, with `vector`'s main (response-average) rows."""
    out = {}
    for name, (records, labels) in checks.items():
        acts = capture_for_check(model, tokenizer, records, batch_size)
        if len(acts.skipped) == len(records):
            raise PersonavecError(f"--check {name}: every chat is longer than the model's context; nothing to score")
        kept = [y for i, y in enumerate(labels) if i not in set(acts.skipped)]
        if len(set(kept)) < 2:
            raise PersonavecError(f"--check {name}: after skipping chats longer than the context only label "
                                  f"{kept[0]} is left; an AUROC needs both")
        out[name] = check_summary(acts, labels, vector.vectors, layer)
    return out


def checks_plot(checks: dict[str, dict], layer: int):
    """AUROC of the response projection by layer, one line per file; the vector's layer and chance marked."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.4))
    for name, entry in checks.items():
        values = entry["by_layer"]["response_projection"]
        points = [(i, v) for i, v in enumerate(values) if v is not None]
        ax.plot([i for i, _ in points], [v for _, v in points], marker="o", ms=3, label=Path(name).name)
    ax.axhline(0.5, color="grey", ls=":", label="chance")
    ax.axvline(layer, color="tab:red", ls="--", label=f"vector's layer {layer}")
    ax.set_ylim(0, 1)
    ax.set_xlabel("layer (0 = embeddings, i = output of block i)")
    ax.set_ylabel("AUROC (response projection)")
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    return fig


def checks_table(checks: dict[str, dict]) -> tuple[list[str], list[list]]:
    headers = ["file", "chats (label 1 / 0)", "AUROC response projection", "best layer (AUROC)",
               "AUROC approx ΔP", "best layer (AUROC)"]
    rows = []
    for name, e in checks.items():
        r, a = e["response_projection"], e["approx_projection_difference"]
        rows.append([name, f"{e['n']} ({e['n_label_1']} / {e['n_label_0']})", _num(r["auroc"]),
                     f"{r['best_layer']} ({_num(r['best_auroc'])})", _num(a["auroc"]),
                     f"{a['best_layer']} ({_num(a['best_auroc'])})"])
    return headers, rows


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"
