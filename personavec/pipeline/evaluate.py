"""`personavec evaluate`: the steering curve (trait and coherence per coefficient) and its capability cost."""

from __future__ import annotations

import hashlib
import json
import statistics
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import torch

from ..breakdown import group_by, report_section
from ..chat import prompt_text, user_chat, write_jsonl
from ..errors import PersonavecError, arg
from ..backends import transformers_model
from ..models import decoder_stack
from ..runs import RunDir, config_dict
from ..traits import Trait
from ..vectors import PersonaVector
from .extract import generate_missing, judge_rows

LETTERS = ("A", "B", "C", "D")


@dataclass
class EvaluateConfig:
    model: str
    trait: str
    vector: str
    judge: str
    coefs: list[float]
    layer: int | None = None
    coef_mode: str = "norm"
    questions: int | None = None  # first N evaluation questions (default: all 20)
    max_new_tokens: int = 96
    batch_size: int = 16
    capability: bool = False
    capability_items: int | None = None
    # the prompting baseline: the same questions unsteered, asked under the trait's pos / neg instruction
    baseline: bool = True
    judge_scheme: str = "score100"  # how trait scores are read (judge.scoring.SCHEMES)
    resume_keys: tuple = field(default=("batch_size",), repr=False)

    def as_config(self) -> dict:
        return config_dict(self)


def capability_items(limit: int | None = None) -> list[dict]:
    path = resources.files("personavec") / "data" / "capability_mc.jsonl"
    items = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    return items[:limit] if limit else items


def mc_prompt(item: dict) -> list[dict]:
    options = "\n".join(f"{letter}) {item['choices'][letter]}" for letter in LETTERS)
    return user_chat(f"{item['question']}\n{options}\nAnswer with the letter of the correct option only.")


@torch.no_grad()
def mc_accuracy(model, tokenizer, items: list[dict], batch_size: int = 16) -> float:
    """Accuracy of the most probable answer letter at the first answer token (right padding, no generation)."""
    model = transformers_model(model, "capability scoring (next-token logits)")
    letter_ids = [tokenizer(letter, add_special_tokens=False)["input_ids"][0] for letter in LETTERS]
    device = next(model.parameters()).device
    correct = 0
    for start in range(0, len(items), batch_size):
        batch = items[start : start + batch_size]
        encoded = [tokenizer(prompt_text(tokenizer, mc_prompt(item)), add_special_tokens=False)["input_ids"] for item in batch]
        width = max(len(ids) for ids in encoded)
        ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, e in enumerate(encoded):
            ids[row, : len(e)], mask[row, : len(e)] = torch.tensor(e), 1
        # the LM head only at each row's last real token: one vocabulary projection per item, not per position
        hidden = decoder_stack(model)(input_ids=ids.to(device), attention_mask=mask.to(device)).last_hidden_state
        last = torch.tensor([len(e) - 1 for e in encoded], device=device)
        logits = model.get_output_embeddings()(hidden[torch.arange(len(batch), device=device), last])
        scores = logits[:, letter_ids]
        correct += sum(LETTERS[int(i)] == item["answer"] for i, item in zip(scores.argmax(-1), batch))
    return correct / len(items)


def _stats(values: list[float | None]) -> dict:
    vals = [v for v in values if v is not None]
    return {"mean": statistics.fmean(vals) if vals else None, "std": statistics.pstdev(vals) if len(vals) > 1 else 0.0,
            "n": len(vals)}


@dataclass
class _Generation:
    """The generation settings of an evaluate run, in the shape `generate_missing` takes."""

    cfg: EvaluateConfig
    temperature: float = 0.0
    seed: int = 0

    @property
    def max_new_tokens(self) -> int:
        return self.cfg.max_new_tokens

    @property
    def batch_size(self) -> int:
        return self.cfg.batch_size


def evaluate_run_config(cfg: EvaluateConfig, vector: PersonaVector) -> dict:
    """The run's identity: the options plus what the vector file holds (a new vector at the same path is a new run)."""
    digest = hashlib.sha256(vector.vectors.numpy().tobytes()).hexdigest()[:16]
    return {"command": "evaluate", **cfg.as_config(), "vector_sha256": digest, "layer": vector.check_layer(cfg.layer)}


# What `by=` can group the steered answers by: a trait's questions are plain text with no fields of their own, so
# the fields an answer has are its coefficient and its question.
EVALUATE_BY = ("coef", "question")


def check_evaluate_by(by: str | None) -> None:
    if by is not None and by not in EVALUATE_BY:
        raise PersonavecError(f"{arg('by', by)}: evaluate groups its steered answers by {' or '.join(EVALUATE_BY)} "
                              "(a trait's questions carry no other fields)")


def evaluate_breakdown(rows: list[dict], by: str) -> dict:
    """The trait scores of the steered answers by `coef` (per coefficient, with a 95% interval) or by `question`
    (per question, with the correlation of its trait score with the coefficient: how far steering moves it)."""
    check_evaluate_by(by)
    values, keys = [r["trait_score"] for r in rows], [r[by] for r in rows]
    if by == "question":
        return group_by(values, keys, scores=[r["coef"] for r in rows], field=by, measure="trait_score",
                        scores_field="coef")
    return group_by(values, keys, field=by, measure="trait_score")


def run_evaluate(cfg: EvaluateConfig, trait: Trait, vector: PersonaVector, model, tokenizer, judge, out: str | Path,
                 force: bool = False, by: str | None = None) -> dict:
    """Answer the trait's evaluation questions under each coefficient (and the prompting baseline), judge them and
    write the run folder; `by` (`coef` or `question`) adds a breakdown of the steered answers' trait scores."""
    from ..report import figure_html, table_html, write_report

    check_evaluate_by(by)
    vector.check_model(model)
    layer = vector.check_layer(cfg.layer)
    run = RunDir(out, evaluate_run_config(cfg, vector), force=force, resume_keys=cfg.resume_keys)
    questions = trait.eval_questions[: cfg.questions or len(trait.eval_questions)]
    vector.check_model(model)
    deltas = {coef: {layer: vector.delta(layer, coef, cfg.coef_mode)} if coef else None for coef in cfg.coefs}
    items = [{"id": f"c{coef:+g}-q{q}", "coef": coef, "question": question}
             for coef in cfg.coefs for q, question in enumerate(questions)]
    baseline_items = baseline_questions(trait, questions, with_plain=0.0 not in cfg.coefs) if cfg.baseline else []
    answered = generate_missing(run, "answers.jsonl", model, tokenizer, items + baseline_items, baseline_chat,
                                _Generation(cfg), deltas_of=lambda it: deltas.get(it.get("coef")))
    done = {row["id"]: row for row in answered}
    every = list(done.values())
    judge_rows(judge, trait, every, cfg.judge_scheme)
    write_jsonl(run.file("judged.jsonl"), every)
    rows = [r for r in every if "condition" not in r]
    baseline = {}
    for condition in BASELINES if cfg.baseline else ():
        mine = ([r for r in rows if r["coef"] == 0.0] if condition == "no_instruction" and 0.0 in cfg.coefs
                else [r for r in every if r.get("condition") == condition])
        baseline[condition] = {"trait": _stats([r["trait_score"] for r in mine]),
                               "coherence": _stats([r["coherence"] for r in mine]), "n": len(mine)}

    capability: dict[float, float] = {}
    if cfg.capability:
        items = capability_items(cfg.capability_items)
        for coef in cfg.coefs:
            with vector.apply(model, layer=layer, coef=coef, coef_mode=cfg.coef_mode):
                capability[coef] = mc_accuracy(model, tokenizer, items, cfg.batch_size)

    curve = []
    for coef in cfg.coefs:
        mine = [r for r in rows if r["coef"] == coef]
        entry = {"coef": coef, "trait": _stats([r["trait_score"] for r in mine]),
                 "coherence": _stats([r["coherence"] for r in mine]), "n": len(mine)}
        if cfg.capability:
            entry["capability_accuracy"] = capability[coef]
        curve.append(entry)
    summary = {"trait": trait.name, "model": cfg.model, "vector": cfg.vector, "layer": layer, "coef_mode": cfg.coef_mode,
               "judge": cfg.judge, "judge_scheme": cfg.judge_scheme, "per_coef": curve}
    if cfg.baseline:
        summary["baseline"] = baseline
    if by is not None:
        summary["by"] = evaluate_breakdown(rows, by)
    run.write_json("summary.json", summary)

    examples = [[r["question"]] + [next((x["answer"] for x in rows if x["question"] == r["question"] and x["coef"] == c), "")
                                   for c in cfg.coefs] for r in rows if r["coef"] == cfg.coefs[0]][:4]
    write_report(run.file("report.html"), f"personavec evaluate: {trait.name} on {cfg.model}", [
        ("Steering curve", figure_html(_curve_plot(curve, layer, cfg.coef_mode, baseline), "steering curve") + table_html(
            ["coef", "trait mean", "trait std", "coherence mean", "coherence std"] + (["capability"] if cfg.capability else []),
            [[e["coef"], e["trait"]["mean"], e["trait"]["std"], e["coherence"]["mean"], e["coherence"]["std"]]
             + ([e["capability_accuracy"]] if cfg.capability else []) for e in curve])),
        ("Example answers", table_html(["question"] + [f"coef {c:+g}" for c in cfg.coefs], examples)),
    ] + ([("Prompting baseline (unsteered; the dotted lines on the curve)", table_html(
        ["condition", "trait mean", "trait std", "coherence mean", "coherence std"],
        [[c, b["trait"]["mean"], b["trait"]["std"], b["coherence"]["mean"], b["coherence"]["std"]]
         for c, b in baseline.items()]))] if baseline else [])
       + ([report_section(summary["by"], [r["trait_score"] for r in rows], [r[by] for r in rows])] if by else []))
    return summary


BASELINES = ("pos_instruction", "neg_instruction", "no_instruction")


def baseline_questions(trait: Trait, questions, with_plain: bool) -> list[dict]:
    """Unsteered items under the trait's instructions (question q uses instruction pair q mod 5), and with no
    instruction unless the curve already has coefficient 0."""
    conditions = BASELINES if with_plain else BASELINES[:2]
    items = []
    for condition in conditions:
        for q, question in enumerate(questions):
            item = {"id": f"b-{condition}-q{q}", "condition": condition, "question": question}
            if condition != "no_instruction":
                item["system"] = trait.system_prompt(q % len(trait.instructions), condition[:3])
            items.append(item)
    return items


def baseline_chat(item: dict) -> list[dict]:
    """A curve item's chat is its question; a baseline item adds its instruction as the system prompt."""
    system = item.get("system")
    return ([{"role": "system", "content": system}] if system else []) + user_chat(item["question"])


def _curve_plot(curve: list[dict], layer: int, coef_mode: str, baseline: dict | None = None):
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    coefs = [e["coef"] for e in curve]
    styles = {"pos_instruction": ("tab:red", "asked for the trait"), "neg_instruction": ("tab:blue", "asked against it"),
              "no_instruction": ("tab:gray", "no instruction")}
    for condition, entry in (baseline or {}).items():
        mean = entry["trait"]["mean"]
        if mean is not None:
            color, label = styles[condition]
            ax.axhline(mean, color=color, ls=":", lw=1.2, label=f"trait, {label} (unsteered)")
    for key, marker in (("trait", "o"), ("coherence", "s")):
        means = [e[key]["mean"] for e in curve]
        stds = [e[key]["std"] for e in curve]
        if all(m is not None for m in means):
            ax.errorbar(coefs, means, yerr=stds, marker=marker, capsize=3, label=key)
    if curve and "capability_accuracy" in curve[0]:
        ax.plot(coefs, [100 * e["capability_accuracy"] for e in curve], marker="^", ls="--", label="capability (% correct)")
    ax.set_xlabel(f"coefficient ({coef_mode}) at layer {layer}")
    ax.set_ylabel("score (0-100)")
    if ax.get_legend_handles_labels()[0]:  # with --judge none there are no scores to plot
        ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return fig
