"""A model's persona at a glance: every trait's reading on the model's own answers, with intervals, and a comparison.

For each trait, the model answers the trait's evaluation questions (greedy). Each answer is read at the trait
vector's layer: the response-mean projection on v_hat (and on the 0..1 scale of the vector's own pos/neg
answers, when the file records them) and the last prompt token's projection before answering; with a judge,
its judged trait score. Every figure gets a bootstrap 95% interval over questions. With a second model (or a
peft adapter over the same base), the per-trait difference (second minus first, paired by question) gets its
own interval, and differences whose interval excludes 0 are marked.

Cost: each model's answers are generated once for all traits, and all traits are read from one capture pass.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..activations import capture
from ..backends import as_backend
from ..breakdown import group_by
from ..errors import PersonavecError, arg
from ..generate import generate
from ..runs import RunDir, config_dict
from ..traits import Trait
from ..vecmath import bootstrap_mean_ci, paired_difference_ci, unit
from ..vectors import PersonaVector

FIGURES = ("response", "response_scaled", "prompt", "judged")


@dataclass
class ProfileConfig:
    model: str
    traits: list[str]
    vectors: str = ""
    compare: str | None = None
    judge: str = "none"
    questions: int | None = None
    max_new_tokens: int = 64
    batch_size: int = 16
    bootstrap: int = 2000
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def as_config(self) -> dict:
        return config_dict(self, command="profile")


def read_model(model, tokenizer, traits: dict[str, tuple[Trait, PersonaVector]], questions: int | None = None,
               max_new_tokens: int = 64, batch_size: int = 16, judge=None, show_progress: bool = True) -> dict:
    """Per trait: its questions, the answers, and per-question readings (`response`, `response_scaled`,
    `prompt`, and `judged` with a judge) as lists of floats (None where a figure cannot be had)."""
    backend = as_backend(model, tokenizer)
    for trait, vector in traits.values():
        vector.check_model(backend)
        if vector.layer is None:
            raise PersonavecError(f"{vector.label}: records no layer to read at")
    asked = {name: list(trait.eval_questions[:questions]) for name, (trait, _) in traits.items()}
    unique = list(dict.fromkeys(q for qs in asked.values() for q in qs))
    chats = [[{"role": "user", "content": q}] for q in unique]
    answers = generate(backend, tokenizer, chats, max_new_tokens=max_new_tokens, batch_size=batch_size,
                       show_progress=show_progress)
    answer_of = dict(zip(unique, answers))
    answered = [chat + [{"role": "assistant", "content": answer_of[q] or " "}] for chat, q in zip(chats, unique)]
    layers = sorted({vector.layer for _, vector in traits.values()})
    acts = capture(backend, tokenizer, answered, layers=layers, positions=("response_avg", "prompt_last"),
                   batch_size=batch_size, show_progress=show_progress)
    row_of = {q: i for i, q in enumerate(unique)}
    out = {}
    for name, (trait, vector) in traits.items():
        column, direction = layers.index(vector.layer), unit(vector.vectors[vector.layer])
        rows = [row_of[q] for q in asked[name]]
        skipped = set(acts.skipped)
        response = [None if r in skipped else float(acts.response_avg[r, column] @ direction) for r in rows]
        prompt = [None if r in skipped else float(acts.prompt_last[r, column] @ direction) for r in rows]
        scaled = [None if v is None else vector.scaled(v, vector.layer) for v in response]
        entry = {"layer": vector.layer, "questions": asked[name], "answers": [answer_of[q] for q in asked[name]],
                 "response": response, "response_scaled": scaled, "prompt": prompt}
        if judge is not None:
            from ..judge import judge_answers

            scores = judge_answers(judge, trait, [(q, answer_of[q]) for q in asked[name]], coherence=False)
            entry["judged"] = [s.get("trait_score") for s in scores]
        out[name] = entry
    return out


def cross_traits(model, tokenizer, traits: dict[str, tuple[Trait, PersonaVector]], steer: list[str],
                 questions: int | None = 5, max_new_tokens: int = 64, batch_size: int = 16, coef: float | None = None,
                 show_progress: bool = True, judge=None) -> dict:
    """Steer each trait in `steer` at its recommended coefficient (the file's, else 0.5 norm-relative) and read every
    trait on the answers: `effect[S][T]` is T's mean response reading under S's steering minus unsteered (on the
    0..1 scale where T's vector records it). All steerings go out in one batch, one row each. Also the cosine of
    every pair of trait vectors, each at its own layer.

    With a judge, `judged_effect[S][T]` is the same difference of T's judged score (0-100), on the answers to T's
    own evaluation questions only (T's questions are the ones written to show T; judging every answer for every
    trait would cost traits x more calls)."""
    from ..backends.base import Steering

    backend = as_backend(model, tokenizer)
    names = list(traits)
    asked = list(dict.fromkeys(q for trait, _ in traits.values() for q in trait.eval_questions[:questions]))
    chats = [[{"role": "user", "content": q}] for q in asked]
    conditions = [None] + list(steer)
    steerings, all_chats = [], []
    used = {}
    for name in conditions:
        if name is None:
            steering = None
        else:
            vector = traits[name][1]
            if vector.coef is None and coef is None and vector.norms is None:
                raise PersonavecError(f"{vector.label}: records neither a coefficient nor activation norms, so no "
                                      "steering strength can be chosen for it")
            c = coef if coef is not None else (vector.coef if vector.coef is not None else 0.5)
            mode = vector.coef_mode if vector.coef is not None and coef is None else "norm"
            used[name] = {"coef": c, "coef_mode": mode, "layer": vector.layer}
            steering = Steering({vector.layer: vector.delta(vector.layer, c, mode)})
        steerings += [steering] * len(chats)
        all_chats += chats
    answers = generate(backend, tokenizer, all_chats, steerings=steerings, max_new_tokens=max_new_tokens,
                       batch_size=batch_size, show_progress=show_progress)
    answered = [chat + [{"role": "assistant", "content": a or " "}] for chat, a in zip(all_chats, answers)]
    layers = sorted({v.layer for _, v in traits.values()})
    acts = capture(backend, tokenizer, answered, layers=layers, positions=("response_avg",), batch_size=batch_size,
                   show_progress=show_progress)
    n = len(chats)
    means: dict = {}
    for k, condition in enumerate(conditions):
        rows = [i for i in range(k * n, (k + 1) * n) if i not in set(acts.skipped)]
        for name, (_, vector) in traits.items():
            direction = unit(vector.vectors[vector.layer])
            values = acts.response_avg[rows, layers.index(vector.layer)] @ direction
            mean = float(values.mean())
            scaled = vector.scaled(mean, vector.layer)
            means[(condition, name)] = scaled if scaled is not None else mean
    effect = {s: {t: means[(s, t)] - means[(None, t)] for t in names} for s in steer}
    cosine = {a: {b: float(unit(traits[a][1].vectors[traits[a][1].layer]) @ unit(traits[b][1].vectors[traits[b][1].layer]))
                  for b in names} for a in names}
    out = {"steered": used, "questions": len(asked), "effect": effect, "cosine": cosine,
           "unsteered": {t: means[(None, t)] for t in names},
           "scale": {t: "0..1" if traits[t][1].scale_at() is not None else "raw" for t in names}}
    if judge is not None:
        scores = _judged_means(judge, traits, conditions, asked, answers, questions)
        out["judged_effect"] = {s: {t: None if scores[(s, t)] is None or scores[(None, t)] is None
                                    else scores[(s, t)] - scores[(None, t)] for t in names} for s in steer}
        out["judged_unsteered"] = {t: scores[(None, t)] for t in names}
    return out


def _judged_means(judge, traits, conditions, asked, answers, questions) -> dict:
    """(condition, trait) -> mean judged trait score of that condition's answers to the trait's own questions."""
    from ..judge import judge_answers

    n, row_of, means = len(asked), {q: i for i, q in enumerate(asked)}, {}
    for name, (trait, _) in traits.items():  # one judge call per trait, every condition in it, so the judge batches
        own = trait.eval_questions[:questions]
        items = [(q, answers[k * n + row_of[q]] or " ") for k in range(len(conditions)) for q in own]
        scores = judge_answers(judge, trait, items, coherence=False)
        for k, condition in enumerate(conditions):
            kept = [s["trait_score"] for s in scores[k * len(own):(k + 1) * len(own)] if s.get("trait_score") is not None]
            means[(condition, name)] = sum(kept) / len(kept) if kept else None
    return means


def _summary(values: list, n: int, seed: int) -> dict | None:
    kept = [v for v in values if v is not None and not math.isnan(v)]
    if not kept:
        return None
    low, high = bootstrap_mean_ci(torch.tensor(kept), n=n, seed=seed)
    return {"mean": sum(kept) / len(kept), "ci": [low, high], "n": len(kept)}


def _difference(first: list, second: list, n: int, seed: int) -> dict | None:
    pairs = [(a, b) for a, b in zip(first, second) if a is not None and b is not None]
    if not pairs:
        return None
    mean, low, high = paired_difference_ci(torch.tensor([a for a, _ in pairs]), torch.tensor([b for _, b in pairs]),
                                           n=n, seed=seed)
    return {"difference": mean, "ci": [low, high], "n": len(pairs), "significant": not low <= 0.0 <= high}


def summarise(readings: dict, cfg: ProfileConfig, compared: dict | None = None) -> dict:
    traits = {}
    for name, entry in readings.items():
        figures = {f: _summary(entry[f], cfg.bootstrap, cfg.seed) for f in FIGURES if f in entry}
        trait = {"layer": entry["layer"], **{f: s for f, s in figures.items() if s is not None}}
        if compared is not None:
            other = compared[name]
            trait["compare"] = {f: _summary(other[f], cfg.bootstrap, cfg.seed) for f in FIGURES if f in other}
            diffs = {f: _difference(entry[f], other[f], cfg.bootstrap, cfg.seed) for f in FIGURES
                     if f in entry and f in other}
            trait["differences"] = {f: d for f, d in diffs.items() if d is not None}
            # the headline: the 0..1 response scale where the vector records it, else the raw projection
            main = trait["differences"].get("response_scaled") or trait["differences"].get("response")
            trait["difference"] = None if main is None else main["difference"]
            trait["difference_scale"] = "response_scaled" if "response_scaled" in trait["differences"] else "response"
            trait["significant"] = bool(main and main["significant"])
        traits[name] = trait
    return {"model": cfg.model, "compare": cfg.compare, "traits": traits}


# What `by=` can group each trait's readings by: the questions are a trait's plain-text evaluation questions, so
# the fields a reading has are the model that answered and the question it answered.
PROFILE_BY = ("model", "question")


def check_profile_by(by: str | None) -> None:
    if by is not None and by not in PROFILE_BY:
        raise PersonavecError(f"{arg('by', by)}: profile groups each trait's readings by {' or '.join(PROFILE_BY)} "
                              "(the answering model, or the evaluation question)")


def profile_breakdown(readings: dict, by: str, cfg: ProfileConfig, compared: dict | None = None) -> dict:
    """Each trait's response readings (on the 0..1 scale where its vector records one, else raw) grouped by the
    answering `model` (`cfg.model`, and `cfg.compare` with `compared`) or by `question`; with judged scores, the
    correlation of the reading with them per group. One flat list of groups, each naming its trait."""
    check_profile_by(by)
    first = cfg.model
    second = cfg.compare if cfg.compare != cfg.model else f"{cfg.compare} (compare)"  # two groups, not one
    groups = []
    judged = False
    for name, entry in readings.items():
        measure = "response_scaled" if any(v is not None for v in entry["response_scaled"]) else "response"
        sets = [(first, entry)] + ([(second, compared[name])] if compared is not None else [])
        values = [v for _, e in sets for v in e[measure]]
        keys = [model if by == "model" else q for model, e in sets for q in e["questions"]]
        scores = [s for _, e in sets for s in e["judged"]] if all("judged" in e for _, e in sets) else None
        judged = judged or scores is not None
        part = group_by(values, keys, scores=scores, field=by, measure=measure, bootstrap=cfg.bootstrap, seed=cfg.seed)
        groups += [{"trait": name, "measure": measure, **g} for g in part["groups"]]
    out = {"field": by, "measure": "response reading (0..1 where the vector records its scale, else raw)"}
    if judged:
        out["scores"] = "judged"
    out["groups"] = groups
    return out


def run_profile(cfg: ProfileConfig, traits: dict[str, tuple[Trait, PersonaVector]], model, tokenizer, out: str | Path,
                judge=None, second=None, force: bool = False, steer: list[str] | None = None,
                by: str | None = None) -> dict:
    """Profile `model` (and `second`, a model or backend to compare with; or, with `steer`, the cross-trait
    effects of steering each of those traits); writes the run folder `out`. `by` (`model` or `question`) adds a
    breakdown of each trait's readings."""
    check_profile_by(by)
    run = RunDir(out, cfg.as_config(), force=force)
    first = read_model(model, tokenizer, traits, cfg.questions, cfg.max_new_tokens, cfg.batch_size, judge)
    run.write_json("readings.json", first)
    compared = None
    if second is not None:
        compared = read_model(second, tokenizer, traits, cfg.questions, cfg.max_new_tokens, cfg.batch_size, judge)
        run.write_json("readings_compare.json", compared)
    summary = summarise(first, cfg, compared)
    if by is not None:
        summary["by"] = profile_breakdown(first, by, cfg, compared)
    if steer:
        summary["cross_traits"] = cross_traits(model, tokenizer, traits, steer, cfg.questions or 5, cfg.max_new_tokens,
                                               cfg.batch_size, judge=judge)
    run.write_json("summary.json", summary)
    _write_report(run.file("report.html"), summary)
    return summary


def _radar(summary: dict):
    import matplotlib.pyplot as plt

    names = list(summary["traits"])
    scaled = all("response_scaled" in t for t in summary["traits"].values())
    figure = "response_scaled" if scaled else "response"
    angles = [2 * math.pi * i / max(len(names), 1) for i in range(len(names))] + [0.0]
    fig = plt.figure(figsize=(5.5, 5.5))
    ax = fig.add_subplot(projection="polar")
    series = [(summary["model"], {n: t.get(figure) for n, t in summary["traits"].items()})]
    if summary.get("compare"):
        series.append((summary["compare"], {n: t["compare"].get(figure) for n, t in summary["traits"].items()}))
    for label, values in series:
        means = [(values[n] or {}).get("mean", 0.0) for n in names]
        ax.plot(angles, means + means[:1], marker="o", label=label)
        ax.fill(angles, means + means[:1], alpha=0.12)
    ax.set_xticks(angles[:-1], names)
    ax.set_title(f"response reading ({'0 = trait-free, 1 = trait-showing' if scaled else 'raw projection'})",
                 fontsize=10)
    ax.legend(loc="lower right", fontsize=8, bbox_to_anchor=(1.25, -0.1))
    return fig


def _write_report(path: Path, summary: dict) -> None:
    from ..report import figure_html, number, table_html, write_report

    def cell(entry, figure):
        s = (entry or {}).get(figure)
        return "-" if not s else f"{number(s['mean'])} [{number(s['ci'][0])}, {number(s['ci'][1])}]"

    rows = []
    for name, t in summary["traits"].items():
        row = [name, t["layer"], cell(t, "response_scaled"), cell(t, "response"), cell(t, "prompt"), cell(t, "judged")]
        if summary.get("compare"):
            d = t["differences"].get(t.get("difference_scale", "response"))
            row += ["-" if not d else f"{number(d['difference'])} [{number(d['ci'][0])}, {number(d['ci'][1])}]"
                    + (" *" if d["significant"] else "")]
        rows.append(row)
    headers = ["trait", "layer", "response 0..1", "response", "pre-answer", "judged"]
    if summary.get("compare"):
        headers.append("difference (second - first) *: interval excludes 0")
    sections = [("Radar", figure_html(_radar(summary), "radar plot of the traits")),
                ("Readings (mean and bootstrap 95% interval over questions)", table_html(headers, rows))]
    if summary.get("by"):
        from ..breakdown import report_section

        sections.append(report_section(summary["by"]))
    if summary.get("cross_traits"):
        sections.append(("Cross-trait effects: steering one trait, reading every trait",
                         figure_html(_heatmaps(summary["cross_traits"]), "cross-trait effect and cosine heatmaps")))
    write_report(path, f"personavec profile: {summary['model']}" + (f" vs {summary['compare']}" if summary.get("compare") else ""),
                 sections)


def _heatmaps(cross: dict):
    import matplotlib.pyplot as plt

    steered, names = list(cross["effect"]), list(cross["cosine"])
    panels = [("effect", "reading change (steered - unsteered)", "{:+.2f}")]
    if cross.get("judged_effect"):
        panels.append(("judged_effect", "judged score change (0-100, own questions)", "{:+.0f}"))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(5.5 * (len(panels) + 1), 0.5 * max(len(names), 4) + 1.5))
    for ax, (key, title, fmt) in zip(axes, panels):
        effect = [[cross[key][s][t] for t in names] for s in steered]
        shown = [[float("nan") if v is None else v for v in row] for row in effect]
        span = max((abs(v) for row in effect for v in row if v is not None), default=1.0) or 1.0
        image = ax.imshow(shown, cmap="RdBu_r", vmin=-span, vmax=span, aspect="auto")
        ax.set_xticks(range(len(names)), names, rotation=45, ha="right")
        ax.set_yticks(range(len(steered)), [f"steer {s}" for s in steered])
        ax.set_title(title, fontsize=10)
        for i, row in enumerate(effect):
            for j, v in enumerate(row):
                ax.text(j, i, "n/a" if v is None else fmt.format(v), ha="center", va="center", fontsize=7)
        fig.colorbar(image, ax=ax, shrink=0.8)
    right = axes[-1]
    cos = [[cross["cosine"][a][b] for b in names] for a in names]
    image = right.imshow(cos, cmap="RdBu_r", vmin=-1, vmax=1, aspect="auto")
    right.set_xticks(range(len(names)), names, rotation=45, ha="right")
    right.set_yticks(range(len(names)), names)
    right.set_title("cosine of the trait vectors (each at its layer)", fontsize=10)
    for i, row in enumerate(cos):
        for j, v in enumerate(row):
            right.text(j, i, f"{v:+.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=right, shrink=0.8)
    fig.tight_layout()
    return fig
