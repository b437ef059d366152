"""`personavec screen`: score training data by projection difference before training on it.

For each sample (prompt x, dataset answer y) at layer L, with v̂ the unit persona vector:

- `response_projection` = mean over y's tokens of h_L · v̂;
- `projection_difference` = response_projection(x, y) - response_projection(x, y_base), where
  y_base is the model's own greedy answer to x (the paper's ΔP per sample; its
  dataset mean is the paper's dataset-level ΔP);
- `approx_projection_difference` = response_projection(x, y) - (h_L at the last prompt token) · v̂,
  which needs no generation: the last prompt token stands in for what the model
  would have said.

Base answers are generated once per (model weights, prompt, generation settings)
and kept in an SQLite cache, so a killed run resumes and a rerun costs nothing.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from pathlib import Path

from ..breakdown import group_by, group_keys, report_section
from ..cache import SqliteCache, cache_dir
from ..chat import ChatRecord, check_screen_answer, label_value, prompt_text, write_jsonl
from ..datasets_io import kept_path, write_chats
from ..errors import PersonavecError, arg
from ..backends import as_backend
from ..report import figure_html, number, table_html, write_report
from ..runs import RunDir, config_dict
from ..vecmath import auroc
from ..vectors import PersonaVector
from .project import distribution, finite, project_chats

SCORES = ("projection_difference", "approx_projection_difference", "response_projection")


@dataclass
class ScreenConfig:
    model: str = ""  # model, vector and data are recorded in the run's config; the scoring does not use them
    vector: str = ""
    data: str = ""
    layer: int | None = None
    approx: bool = False
    max_new_tokens: int = 128  # length of the base model's greedy answers
    batch_size: int = 16
    max_length: int | None = None  # skip longer chats (default: the model's context)

    @property
    def rank_by(self) -> str:
        return "approx_projection_difference" if self.approx else "projection_difference"

    def as_config(self) -> dict:
        return config_dict(self, command="screen")


class BaseAnswerCache(SqliteCache):
    """The model's own greedy answers, keyed by (model fingerprint, max_new_tokens, templated prompt)."""

    def __init__(self, path: str | Path | None = None):
        super().__init__(path or self.default_path(), table="base_answers")

    @staticmethod
    def default_path() -> Path:
        return cache_dir() / "base_answers.sqlite"


def base_answers(model, tokenizer, prompts: list[list[dict]], max_new_tokens: int = 128, batch_size: int = 16,
                 cache: BaseAnswerCache | None = None, show_progress: bool = True) -> list[str]:
    """Greedy answers of `model` to each prompt; cached answers are reused, new ones are stored batch by batch."""
    from ..generate import generate

    cache = BaseAnswerCache() if cache is None else cache  # an empty cache is falsy (it has __len__)
    fingerprint = as_backend(model).fingerprint()
    keys = [cache.key(fingerprint, str(max_new_tokens), prompt_text(tokenizer, p)) for p in prompts]
    answers = [(cache.get(k) or {}).get("answer") for k in keys]
    first_missing: dict[str, int] = {}  # a prompt repeated in the data is generated once
    for i, (key, answer) in enumerate(zip(keys, answers)):
        if answer is None:
            first_missing.setdefault(key, i)
    todo = list(first_missing.values())
    if todo:
        def on_batch(indices, new):
            for j, answer in zip(indices, new):
                cache.put(keys[todo[j]], {"answer": answer})

        new = generate(model, tokenizer, [prompts[i] for i in todo], max_new_tokens=max_new_tokens, temperature=0.0,
                       batch_size=batch_size, show_progress=show_progress, on_batch=on_batch)
        by_key = {keys[i]: a for i, a in zip(todo, new)}
        answers = [by_key.get(k, a) for k, a in zip(keys, answers)]
    return answers  # type: ignore[return-value]


def screen_records(model, tokenizer, records: list[ChatRecord], vector: PersonaVector, cfg: ScreenConfig,
                   cache: BaseAnswerCache | None = None, show_progress: bool = True) -> tuple[list[dict], list[str]]:
    """Score each chat; returns (`persona` dicts in input order, base answers or [] with `approx`).

    A chat longer than the context limit gets null scores and `"skipped"`.
    """
    check_screen_records(records)
    vector.check_model(model)
    layer = vector.check_layer(cfg.layer)
    data = project_chats(model, tokenizer, [r.messages for r in records], vector, layer,
                         ("response_avg", "prompt_last"), batch_size=cfg.batch_size, max_length=cfg.max_length,
                         show_progress=show_progress, label="chats")
    response, prompt_last = data["response_avg"], data["prompt_last"]
    difference = [math.nan] * len(records)
    answers: list[str] = []
    if not cfg.approx:
        skipped = set(data.skipped)
        scored = [i for i in range(len(records)) if i not in skipped]
        answers_scored = base_answers(model, tokenizer, [records[i].prompt for i in scored], cfg.max_new_tokens,
                                      cfg.batch_size, cache, show_progress)
        answers = [""] * len(records)
        for i, a in zip(scored, answers_scored):
            answers[i] = a
        usable = [i for i in scored if answers[i].strip()]
        if len(usable) < len(scored):
            warnings.warn(f"{len(scored) - len(usable)} base answers were empty; those chats get no "
                          "projection_difference", stacklevel=2)
        base_chats = [records[i].prompt + [{"role": "assistant", "content": answers[i]}] for i in usable]
        # (a_data - a_base) · v̂ = a_data · v̂ - a_base · v̂, so the difference of projections is the projection
        # of the difference, the paper's ΔP.
        base = project_chats(model, tokenizer, base_chats, vector, layer, ("response_avg",), batch_size=cfg.batch_size,
                             max_length=None, show_progress=show_progress, label="base answers")["response_avg"]
        for i, b in zip(usable, base):
            difference[i] = response[i] - b
    personas = []
    for i in range(len(records)):
        if math.isnan(response[i]):
            persona = {"layer": layer, "response_projection": None, "approx_projection_difference": None,
                       "skipped": "longer than the context limit"}
            if not cfg.approx:
                persona["projection_difference"] = None
        else:
            persona = {"layer": layer, "response_projection": response[i],
                       "approx_projection_difference": response[i] - prompt_last[i]}
            if not cfg.approx:
                persona["projection_difference"] = None if math.isnan(difference[i]) else difference[i]
        personas.append(persona)
    return personas, answers


def check_screen_records(records: list[ChatRecord]) -> None:
    """Every chat needs a non-empty final answer (screen scores it); refused before any model runs."""
    missing = next((r for r in records if not r.has_response), None)
    if missing is not None:
        raise PersonavecError(f"{missing.where}: the chat has no final assistant message; screen scores the answer")
    for record in records:
        check_screen_answer(record)


def read_labels(records: list[ChatRecord], name: str) -> list[int]:
    return [label_value(record, name) for record in records]


def select_rows(personas: list[dict], rank_by: str, drop_top: float | None = None,
                keep_below: float | None = None) -> list[int]:
    """Indices kept by `--drop-top` (a fraction of the scored rows, highest `rank_by` first) or `--keep-below`
    (score strictly below). Rows without a score (skipped) are never kept: they were not screened."""
    scored = [i for i, p in enumerate(personas) if p.get(rank_by) is not None]
    if drop_top is not None:
        if not 0 <= drop_top < 1:
            raise PersonavecError(f"{arg('drop_top', drop_top)}: give a fraction in [0, 1), e.g. 0.1 for the top 10%")
        n_drop = round(drop_top * len(scored))
        dropped = set(sorted(scored, key=lambda i: -personas[i][rank_by])[:n_drop])
        return [i for i in scored if i not in dropped]
    if keep_below is not None:
        return [i for i in scored if personas[i][rank_by] < keep_below]
    return scored


def screen_summary(records: list[ChatRecord], personas: list[dict], rank_by: str, labels: list[int] | None,
                   top_k: int = 20, by: str | None = None, labels_field: str | None = None,
                   keys: list | None = None) -> dict:
    """Distribution, dataset mean and top lines of each score, AUROC against `labels`; with `by`, the breakdown of
    the `rank_by` score by that field of the lines (per value: count, mean, sd, 95% CI, AUROC; `keys`: its value on
    each line, default: read from `records`)."""
    scores = [s for s in SCORES if s in personas[0]]
    column = {s: [math.nan if p[s] is None else p[s] for p in personas] for s in scores}
    ranked = sorted((i for i, v in enumerate(column[rank_by]) if not math.isnan(v)), key=lambda i: -column[rank_by][i])
    summary = {
        "n": len(personas), "skipped": sum("skipped" in p for p in personas), "rank_by": rank_by,
        # the dataset-level ΔP is the mean of the per-sample projection differences
        "mean": {s: (finite(column[s]).mean().item() if len(finite(column[s])) else None) for s in scores},
        "distribution": {s: distribution(column[s]) for s in scores},
        "top": [{"line": i + 1, "score": column[rank_by][i], "prompt": _text(records[i].prompt[-1]["content"]),
                 "answer": _text(records[i].response)} for i in ranked[:top_k]],
    }
    if labels is not None:
        summary["auroc"] = {}
        for s in scores:
            pairs = [(y, v) for y, v in zip(labels, column[s]) if not math.isnan(v)]
            summary["auroc"][s] = auroc([y for y, _ in pairs], [v for _, v in pairs])
    if by is not None:
        keys = group_keys(records, by) if keys is None else keys
        summary["by"] = group_by(column[rank_by], keys, labels, field=by, measure=rank_by,
                                 labels_field=labels_field if labels is not None else None)
    return summary


def _text(text: str, width: int = 100) -> str:
    text = " ".join(text.split())
    return text if len(text) <= width else text[: width - 1] + "…"


def run_screen(cfg: ScreenConfig, records: list[ChatRecord], vector: PersonaVector, model, tokenizer,
               output: str | Path, run_dir: str | Path, labels_field: str | None = None, drop_top: float | None = None,
               keep_below: float | None = None, top_k: int = 20, cache: BaseAnswerCache | None = None,
               by: str | None = None) -> dict:
    """Score, write the scored output (and the filtered one), the run folder's summary and report.

    The Ray path (`personavec.pipeline.scale.ray_screen`) scores on an actor pool and shares everything after the
    scores (`finish_screen`).
    """
    if drop_top is not None and keep_below is not None:
        raise PersonavecError(f"use either {arg('drop_top')} or {arg('keep_below')}, not both")
    labels = read_labels(records, labels_field) if labels_field else None
    keys = group_keys(records, by) if by else None  # a line without the field is refused before any scoring
    vector.check_model(model)  # a vector for another model says so before anything about its layer
    layer = vector.check_layer(cfg.layer)
    run = RunDir.replace(run_dir, screen_run_config(cfg, layer, labels_field, drop_top, keep_below, by))
    personas, answers = screen_records(model, tokenizer, records, vector, cfg, cache)
    return finish_screen(cfg, records, personas, answers, labels, vector, layer, output, run, drop_top, keep_below,
                         top_k, labels_field, by, keys)


def screen_run_config(cfg: ScreenConfig, layer: int, labels_field, drop_top, keep_below, by=None,
                      extra_config: dict | None = None) -> dict:
    return {**cfg.as_config(), "layer": layer, "labels": labels_field, "drop_top": drop_top, "keep_below": keep_below,
            "by": by, **(extra_config or {})}


def finish_screen(cfg: ScreenConfig, records, personas: list[dict], answers, labels: list[int] | None,
                  vector: PersonaVector, layer: int, output: str | Path, run: RunDir, drop_top: float | None,
                  keep_below: float | None, top_k: int, labels_field: str | None = None, by: str | None = None,
                  keys: list | None = None) -> dict:
    """Everything after the scores: the scored output, base answers, summary, filtered output and report.

    `records` is read in order (twice with a filter) and by index for the top lines only, so the Ray path hands a
    view that streams its rows from the input file; `answers` is iterated once; `keys` are the `by` field's values."""
    output = Path(output)
    write_chats(output, ({**r.to_json(), "persona": p} for r, p in zip(records, personas)), like=records)
    if len(answers):
        write_jsonl(run.file("base_answers.jsonl"), ({"line": i + 1, "answer": a} for i, a in enumerate(answers)))
    summary = screen_summary(records, personas, cfg.rank_by, labels, top_k, by, labels_field, keys)
    summary.update(trait=vector.trait, layer=layer, data=cfg.data, output=str(output))
    if drop_top is not None or keep_below is not None:
        kept = select_rows(personas, cfg.rank_by, drop_top, keep_below)
        filtered = kept_path(output)
        # the original lines, without the added scores: ready to train on
        write_chats(filtered, (records[i].to_json() for i in kept), like=records)
        summary["filtered"] = {"path": str(filtered), "kept": len(kept), "of": len(records),
                               "rule": f"drop top {drop_top:.0%}" if drop_top is not None else f"{cfg.rank_by} < {keep_below}"}
    run.write_json("summary.json", summary)
    _write_report(run.file("report.html"), summary, personas, labels, cfg, keys)
    return summary


def _write_report(path: Path, summary: dict, personas: list[dict], labels: list[int] | None, cfg: ScreenConfig,
                  keys: list | None = None) -> None:
    import matplotlib.pyplot as plt

    sections = []
    for score in [s for s in SCORES if s in personas[0]]:
        fig, ax = plt.subplots(figsize=(7, 3))
        values = [(p[score], labels[i] if labels else None) for i, p in enumerate(personas) if p[score] is not None]
        bins = min(50, max(5, len(values) // 4))
        if labels:
            for y, color in ((0, "tab:blue"), (1, "tab:red")):
                ax.hist([v for v, lab in values if lab == y], bins=bins, alpha=0.6, color=color, label=f"label {y}")
            ax.legend()
        else:
            ax.hist([v for v, _ in values], bins=bins, color="tab:blue", alpha=0.8)
        mean = summary["mean"][score]
        if mean is not None:
            ax.axvline(mean, color="k", ls="--", lw=1)
        ax.set_xlabel(f"{score} at layer {summary['layer']} (dashed: dataset mean {number(mean)})")
        ax.set_ylabel("samples")
        note = f"<p>AUROC against labels: {number(summary['auroc'][score])}</p>" if labels else ""
        sections.append((score, figure_html(fig, f"histogram of {score}") + note))
    if "by" in summary:
        sections.append(report_section(summary["by"], [p[summary["rank_by"]] for p in personas], keys))
    sections.append((f"Ranking by {summary['rank_by']} (highest first)", table_html(
        ["line", "score", "prompt", "answer"], [[t["line"], t["score"], t["prompt"], t["answer"]] for t in summary["top"]])))
    if "filtered" in summary:
        f = summary["filtered"]
        sections.append(("Filtered dataset", f"<p>{f['kept']} of {f['of']} kept ({f['rule']}): <code>{f['path']}</code></p>"))
    write_report(path, f"personavec screen: {summary['trait'] or 'vector'} on {cfg.data}", sections)
