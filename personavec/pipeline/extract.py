"""`personavec extract`: the paper's automated pipeline, resumable, with a report.

1. generate answers to the trait's extraction questions under every pos and neg
   instruction (appended to `responses.jsonl` as produced);
2. judge trait and coherence (cached), keep pos/neg *pairs* that pass, matched
   by pair id (instruction, question, sample), never by row order;
3. mean-difference vectors at every layer and position -> `vectors.safetensors`;
4. steer candidate layers on held-out evaluation questions and keep the layer
   with the highest trait score whose coherence stays above the threshold
   (with `--judge none`: the layer with the best pos/neg separation);
5. with `checks` (labelled chat files), the AUROC of the new vector's readings on each, at every layer;
6. `summary.json` and `report.html`.

Killing it and running the same command again continues where it stopped:
answers already written are not regenerated, judge calls come from the cache.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..activations import capture
from ..chat import user_chat, write_jsonl
from ..errors import PersonavecError, arg
from ..languages import get_language
from ..backends import as_backend
from ..progress import progress_bar
from ..runs import RunDir, config_dict
from ..traits import Trait
from ..vectors import PersonaVector
from .contrast import middle_layers, separation_by_layer


@dataclass
class ExtractConfig:
    model: str
    trait: str
    judge: str
    questions: int | None = None  # first N extraction questions (default: all 20)
    samples_per_question: int = 1
    max_new_tokens: int = 96
    temperature: float = 0.0  # greedy by default: reproducible; use > 0 with several samples per question
    seed: int = 0
    batch_size: int = 16
    pos_threshold: float = 50.0  # keep pos answers with trait score >= this
    neg_threshold: float = 50.0  # keep neg answers with trait score < this
    coherence_threshold: float = 50.0
    candidate_layers: list[int] | None = None  # default: 5 layers spread over the middle half
    sweep_coef: float = 0.5  # norm-relative coefficient for the layer sweep
    sweep_questions: int = 5
    dtype: str = "auto"
    judge_scheme: str = "score100"  # how trait scores are read (judge.scoring.SCHEMES)
    recipe: str = "paper"  # RECIPES
    resume_keys: tuple = field(default=("batch_size",), repr=False)

    def as_config(self) -> dict:
        data = config_dict(self)
        if data["recipe"] == "paper":  # runs made before recipes existed stay resumable
            del data["recipe"]
        return data


RECIPES = {
    "paper": "the paper's: each instruction pair as written",
    "registers": "each pair also asks for one written form (a letter, bullet points, ...), the same on both sides, "
                 "cycling over the pairs, so the vector cannot learn the form of the extraction answers",
}


def check_recipe(recipe: str, trait: Trait | None = None) -> str:
    if recipe not in RECIPES:
        raise PersonavecError(f"{arg('recipe', recipe)}: unknown recipe; use one of {', '.join(RECIPES)}")
    if recipe == "registers" and trait is not None:
        if not get_language(trait.language).registers:
            raise PersonavecError(f"{arg('recipe', recipe)}: no register phrases for language {trait.language!r} "
                                  "(personavec/languages.py); use the paper recipe")
    return recipe


def extraction_items(trait: Trait, n_questions: int | None, samples: int, recipe: str = "paper") -> list[dict]:
    """Every (polarity, instruction, question, sample) with its pair id and system prompt; with the `registers`
    recipe both prompts of pair (i, q, s) end with register (i + q + s) mod R of the trait's language."""
    if n_questions is not None and n_questions < 1:
        raise PersonavecError(f"{arg('questions', n_questions)}: give at least 1 (or None for all "
                              f"{len(trait.extract_questions)})")
    if samples < 1:
        raise PersonavecError(f"{arg('samples_per_question', samples)}: give at least 1")
    check_recipe(recipe, trait)
    questions = trait.extract_questions[: n_questions or len(trait.extract_questions)]
    language = get_language(trait.language)
    registers = language.registers if recipe == "registers" else ()
    items = []
    for i in range(len(trait.instructions)):
        for q, question in enumerate(questions):
            for s in range(samples):
                pair = f"i{i}-q{q}-s{s}"
                register = registers[(i + q + s) % len(registers)] if registers else None
                for polarity in ("pos", "neg"):
                    system = trait.system_prompt(i, polarity)
                    item = {"id": f"{polarity}-{pair}", "pair": pair, "polarity": polarity, "instruction": i,
                            "question_index": q, "sample": s, "system": system, "question": question}
                    if register is not None:
                        item.update(system=f"{system}{language.sep}{register}", register=register)
                    items.append(item)
    return items


def item_chat(item: dict, with_answer: bool = True) -> list[dict]:
    messages = [{"role": "system", "content": item["system"]}, {"role": "user", "content": item["question"]}]
    return messages + ([{"role": "assistant", "content": item["answer"]}] if with_answer else [])


def generate_missing(run: RunDir, name: str, model, tokenizer, items: list[dict], chat_of,
                     cfg, deltas_of=None) -> list[dict]:
    """Answer the items not yet in `run/name`, appending each batch as it is produced; return all rows by id.

    `cfg` is any config with `max_new_tokens`, `temperature`, `batch_size` and `seed`. `deltas_of(item)` gives an
    item's own steering ({layer: delta} or None; return the same dict for the same steering): the vLLM engine
    mixes them in one batch, transformers runs each group in turn.
    """
    from ..generate import generate_each

    done = {row["id"]: row for row in run.read_jsonl(name)}
    todo = [item for item in items if item["id"] not in done]
    if todo:
        def on_batch(indices, answers):
            rows = [{**todo[i], "answer": a} for i, a in zip(indices, answers)]
            run.append_jsonl(name, rows)
            done.update({row["id"]: row for row in rows})

        deltas = [deltas_of(item) if deltas_of else None for item in todo]
        generate_each(model, tokenizer, [chat_of(item) for item in todo], deltas, max_new_tokens=cfg.max_new_tokens,
                      temperature=cfg.temperature, batch_size=cfg.batch_size, seed=cfg.seed, on_batch=on_batch)
    return [done[item["id"]] for item in items]


def judge_rows(judge, trait: Trait, rows: list[dict], scheme: str = "score100") -> None:
    """Add `trait_score` and `coherence` to each row (in place); cached judge calls cost nothing on reruns."""
    from ..judge import judge_answers, judge_calls

    if judge is None:
        for row in rows:
            row["trait_score"] = row["coherence"] = None
        return
    with progress_bar("judging", total=judge_calls(scheme) * len(rows)) as advance:
        scores = judge_answers(judge, trait, [(r["question"], r["answer"]) for r in rows], progress=advance,
                               scheme=scheme)
    for row, score in zip(rows, scores):
        row.update(score)


def keep_pairs(rows: list[dict], cfg: ExtractConfig, judged: bool) -> tuple[list[dict], list[dict], dict]:
    """Pos/neg pairs where both answers pass their thresholds; returns (kept pos, kept neg, counts)."""
    def passes(row) -> bool:
        if not judged:
            return True
        t, c = row["trait_score"], row["coherence"]
        if t is None or c is None or c < cfg.coherence_threshold:
            return False
        return t >= cfg.pos_threshold if row["polarity"] == "pos" else t < cfg.neg_threshold

    by_pair: dict[str, dict[str, dict]] = {}
    for row in rows:
        row["kept_alone"] = passes(row)
        by_pair.setdefault(row["pair"], {})[row["polarity"]] = row
    pos, neg = [], []
    for pair in by_pair.values():
        keep = "pos" in pair and "neg" in pair and pair["pos"]["kept_alone"] and pair["neg"]["kept_alone"]
        for row in pair.values():
            row["kept"] = keep
        if keep:
            pos.append(pair["pos"])
            neg.append(pair["neg"])
    counts = {
        "generated": len(rows), "pairs": len(by_pair), "pairs_kept": len(pos),
        "pos_failing_trait": sum(1 for r in rows if judged and r["polarity"] == "pos" and r["trait_score"] is not None and r["trait_score"] < cfg.pos_threshold),
        "neg_failing_trait": sum(1 for r in rows if judged and r["polarity"] == "neg" and r["trait_score"] is not None and r["trait_score"] >= cfg.neg_threshold),
        "failing_coherence": sum(1 for r in rows if judged and r["coherence"] is not None and r["coherence"] < cfg.coherence_threshold),
        "unscored": sum(1 for r in rows if judged and (r["trait_score"] is None or r["coherence"] is None)),
    }
    return pos, neg, counts


def explain_empty(counts: dict, cfg: ExtractConfig) -> PersonavecError:
    return PersonavecError(
        f"every pair was filtered out: {counts['pos_failing_trait']} pos answers scored < --pos-threshold "
        f"{cfg.pos_threshold}, {counts['neg_failing_trait']} neg answers scored >= --neg-threshold {cfg.neg_threshold}, "
        f"{counts['failing_coherence']} answers had coherence < --coherence-threshold {cfg.coherence_threshold}, "
        f"{counts['unscored']} got no score; run `personavec judge-check` and pass its calibrated thresholds, "
        "or lower the failing threshold")


def default_candidates(total: int, count: int = 5) -> list[int]:
    middle = middle_layers(total)
    if len(middle) <= count:
        return middle
    step = (len(middle) - 1) / (count - 1)
    return sorted({middle[round(k * step)] for k in range(count)})


def check_candidate_layers(layers: list[int], total: int) -> list[int]:
    """Steering layers for the sweep: 1..total (0 is the embedding output, and names the unsteered baseline)."""
    bad = [layer for layer in layers if not 1 <= layer <= total]
    if bad or not layers:
        raise PersonavecError(f"{arg('candidate_layers', ','.join(map(str, bad or layers)), flag='--layers')}: "
                              f"candidate layers must lie in 1..{total} (this model's blocks; 0 is the embedding "
                              "output)")
    return sorted(set(layers))


def layer_sweep(run: RunDir, model, tokenizer, vector: PersonaVector, trait: Trait, judge, cfg: ExtractConfig,
                candidates: list[int]) -> list[dict]:
    """Answers to held-out eval questions steered at each candidate layer (coef 0 = baseline), judged."""
    questions = trait.eval_questions[: cfg.sweep_questions]
    vector.check_model(model)
    deltas = {layer: {layer: vector.delta(layer, cfg.sweep_coef, "norm")} for layer in candidates}
    items = [{"id": f"L{layer}-q{q}", "layer": layer, "coef": 0.0 if layer == 0 else cfg.sweep_coef,
              "question": question}
             for layer in [0] + candidates for q, question in enumerate(questions)]  # "layer 0": unsteered baseline
    rows = generate_missing(run, "sweep.jsonl", model, tokenizer, items, lambda it: user_chat(it["question"]), cfg,
                            deltas_of=lambda it: deltas.get(it["layer"]))
    judge_rows(judge, trait, rows, cfg.judge_scheme)
    return rows


def summarize_sweep(rows: list[dict], candidates: list[int]) -> list[dict]:
    table = []
    for layer in [0] + candidates:
        mine = [r for r in rows if r["layer"] == layer]
        t = [r["trait_score"] for r in mine if r["trait_score"] is not None]
        c = [r["coherence"] for r in mine if r["coherence"] is not None]
        table.append({"layer": layer, "steered": layer != 0, "trait": sum(t) / len(t) if t else None,
                      "coherence": sum(c) / len(c) if c else None, "n": len(mine)})
    return table


def choose_layer(table: list[dict], coherence_threshold: float) -> tuple[int, str]:
    steered = [row for row in table if row["steered"] and row["trait"] is not None]
    if not steered:
        raise PersonavecError("the layer sweep produced no judged answers; check the judge")
    coherent = [row for row in steered if row["coherence"] is not None and row["coherence"] >= coherence_threshold]
    if coherent:
        best = max(coherent, key=lambda row: row["trait"])
        return best["layer"], f"highest trait score among layers with coherence >= {coherence_threshold}"
    best = max(steered, key=lambda row: (row["coherence"] or 0))
    return best["layer"], f"no layer kept coherence >= {coherence_threshold}; chose the most coherent"


@dataclass
class ExtractResult:
    out: Path
    vector: PersonaVector
    summary: dict


def run_extract(cfg: ExtractConfig, trait: Trait, model, tokenizer, judge, out: str | Path, force: bool = False,
                judge_calibration: dict | None = None, checks=None) -> ExtractResult:
    """`checks`: labelled chat files (paths, or `pipeline.check.read_check_files`'s result), read and validated
    before anything is generated; each gets its AUROC table under `summary["checks"]` and in the report. They are
    not part of the run's config: they do not change the vector, so a rerun with other checks resumes."""
    from ..report import figure_html, layer_plot, table_html, write_report
    from .check import checks_plot, checks_table, read_check_files, run_checks

    if checks is not None and not isinstance(checks, dict):
        checks = read_check_files(checks)
    total = as_backend(model).n_layers
    candidates = check_candidate_layers(cfg.candidate_layers, total) if cfg.candidate_layers else \
        default_candidates(total)
    items = extraction_items(trait, cfg.questions, cfg.samples_per_question, cfg.recipe)  # checks the counts
    run = RunDir(out, {"command": "extract", **cfg.as_config()}, force=force, resume_keys=cfg.resume_keys)
    torch.manual_seed(cfg.seed)
    rows = generate_missing(run, "responses.jsonl", model, tokenizer, items, lambda it: item_chat(it, False), cfg)
    judged = judge is not None
    judge_rows(judge, trait, rows, cfg.judge_scheme)
    pos, neg, counts = keep_pairs(rows, cfg, judged)
    write_jsonl(run.file("judged.jsonl"), rows)
    if not pos:
        raise explain_empty(counts, cfg)

    # Answers longer than the context are skipped (kept() drops their rows) and not counted in n_pos / n_neg.
    pos_acts = capture(model, tokenizer, [item_chat(r) for r in pos], batch_size=cfg.batch_size).kept()
    neg_acts = capture(model, tokenizer, [item_chat(r) for r in neg], batch_size=cfg.batch_size).kept()
    vector = PersonaVector.from_activations(pos_acts, neg_acts, model=model, trait=trait.name, counts=counts)
    vector.model = cfg.model
    separations = separation_by_layer(vector, pos_acts, neg_acts)

    sweep_table: list[dict] = []
    if judged:
        sweep_rows = layer_sweep(run, model, tokenizer, vector, trait, judge, cfg, candidates)
        write_jsonl(run.file("sweep_judged.jsonl"), sweep_rows)
        sweep_table = summarize_sweep(sweep_rows, candidates)
        layer, method = choose_layer(sweep_table, cfg.coherence_threshold)
    else:
        sweep_rows = []
        layer = max(candidates, key=lambda candidate: separations[candidate])
        method = "no judge: best pos/neg separation (Cohen's d) among the candidate layers"
    vector.layer, vector.coef, vector.coef_mode = layer, cfg.sweep_coef, "norm"
    vector.extra.update({"layer_method": method, "thresholds": {"pos": cfg.pos_threshold, "neg": cfg.neg_threshold,
                                                               "coherence": cfg.coherence_threshold}, "judge": cfg.judge})
    vector.save(run.file("vectors.safetensors"))

    summary = {"trait": trait.name, "model": cfg.model, "judge": cfg.judge, "judge_scheme": cfg.judge_scheme, "recipe": cfg.recipe, "judged": judged, "layer": layer,
               "coef": cfg.sweep_coef, "coef_mode": "norm", "layer_method": method, "counts": counts,
               "n_pos": vector.n_pos, "n_neg": vector.n_neg, "separation_by_layer": separations, "layer_sweep": sweep_table,
               "judge_calibration": judge_calibration}
    if not judged:
        summary["note"] = "--judge none: every answer was kept unfiltered and the layer was chosen by separation"
    if checks:
        summary["checks"] = run_checks(model, tokenizer, vector, checks, layer, cfg.batch_size)
    run.write_json("summary.json", summary)

    sections = [("Summary", table_html(["trait", "model", "judge", "layer", "coef (norm)", "pairs kept"],
                                       [[trait.name, cfg.model, cfg.judge, layer, cfg.sweep_coef,
                                         f"{counts['pairs_kept']} of {counts['pairs']}"]]) + f"<p>{method}</p>"),
                ("Per-layer separation of pos/neg",
                 figure_html(layer_plot(list(range(total + 1)), separations, "Cohen's d", "pos vs neg projection", layer), "separation"))]
    if sweep_table:
        sections.append(("Layer sweep", figure_html(_sweep_plot(sweep_table, layer), "layer sweep")
                         + table_html(["layer", "trait", "coherence", "n"],
                                      [[r["layer"] if r["steered"] else "unsteered", r["trait"], r["coherence"], r["n"]] for r in sweep_table])))
        sections.append(("Judged scores of kept and dropped answers", figure_html(_scores_plot(rows), "scores")))
    if checks:
        headers, table_rows = checks_table(summary["checks"])
        sections.append(("Checks: AUROC on labelled files", figure_html(checks_plot(summary["checks"], layer), "checks")
                         + table_html(headers, table_rows)
                         + "<p>response projection: mean of h·v̂ over the answer's tokens; approx ΔP: that minus the "
                           "last prompt token's (as in <code>screen --approx</code>). The best layer is chosen on the "
                           "file itself.</p>"))
    sections.append(("Example answers (pos / neg)", table_html(
        ["polarity", "system", "question", "answer", "trait", "coherence", "kept"],
        [[r["polarity"], r["system"], r["question"], r["answer"], r["trait_score"], r["coherence"], r["kept"]]
         for r in (pos[:3] + neg[:3] if pos else rows[:6])])))
    if sweep_rows:
        base = {r["question"]: r["answer"] for r in sweep_rows if r["layer"] == 0}
        steered = [r for r in sweep_rows if r["layer"] == layer]
        sections.append((f"Steered (layer {layer}, coef {cfg.sweep_coef}) vs unsteered", table_html(
            ["question", "unsteered", "steered"], [[r["question"], base.get(r["question"], ""), r["answer"]] for r in steered])))
    write_report(run.file("report.html"), f"personavec extract: {trait.name} on {cfg.model}", sections)
    return ExtractResult(out=run.path, vector=vector, summary=summary)


def _sweep_plot(table: list[dict], chosen: int):
    import matplotlib.pyplot as plt

    steered = [r for r in table if r["steered"]]
    base = next((r for r in table if not r["steered"]), None)
    fig, ax = plt.subplots(figsize=(7, 3.2))
    ax.plot([r["layer"] for r in steered], [r["trait"] for r in steered], marker="o", label="trait")
    ax.plot([r["layer"] for r in steered], [r["coherence"] for r in steered], marker="s", label="coherence")
    if base and base["trait"] is not None:
        ax.axhline(base["trait"], color="tab:blue", ls=":", label="trait, unsteered")
    ax.axvline(chosen, color="tab:red", ls="--", label=f"chosen layer {chosen}")
    ax.set_xlabel("steered layer")
    ax.set_ylabel("judge score (0-100)")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig


def _scores_plot(rows: list[dict]):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for polarity, color in (("pos", "tab:red"), ("neg", "tab:blue")):
        for kept, marker in ((True, "o"), (False, "x")):
            pts = [(r["trait_score"], r["coherence"]) for r in rows if r["polarity"] == polarity and r.get("kept") == kept
                   and r["trait_score"] is not None and r["coherence"] is not None]
            if pts:
                ax.scatter(*zip(*pts), c=color, marker=marker, alpha=0.7, label=f"{polarity} {'kept' if kept else 'dropped'}")
    ax.set_xlabel("trait score")
    ax.set_ylabel("coherence")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
