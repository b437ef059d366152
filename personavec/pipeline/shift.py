"""`personavec shift`: how far fine-tuning moved a model along a persona vector.

On the trait's evaluation questions, the mean activation of the fine-tuned model
minus that of the base model, at every layer, projected on the unit persona
vector of that layer. Two readings, as in the paper:
- `prompt_last`: the last prompt token, before any answer (the same prompts for both);
- `response_avg`: the mean over each model's own greedy answer.
With a judge, both models' answers are scored and the change in trait score is
reported next to the projected shift.

The fine-tuned model is a full model folder, or a peft LoRA adapter folder that
is loaded on top of the base model.
"""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..activations import capture
from ..chat import read_text, user_chat, write_jsonl
from ..errors import PersonavecError
from ..models import load_model, model_fingerprint, resolve
from ..report import figure_html, table_html, write_report
from ..runs import RunDir, config_dict
from ..traits import Trait
from ..vecmath import cosine, layerwise_projection
from ..vectors import PersonaVector
from .extract import generate_missing, judge_rows

ADAPTER_META = "personavec_adapter.json"  # written by `personavec finetune` next to peft's adapter files


@dataclass
class ShiftConfig:
    base: str
    finetuned: str
    vector: str
    trait: str
    judge: str = "none"
    layer: int | None = None
    questions: int | None = None  # first N evaluation questions (default: all 20)
    responses: bool = True  # also the response-mean shift (needs both models to answer)
    max_new_tokens: int = 64
    temperature: float = 0.0
    batch_size: int = 16
    seed: int = 0
    resume_keys: tuple = field(default=("batch_size",), repr=False)

    def as_config(self) -> dict:
        return config_dict(self, command="shift")


@dataclass
class SideMeans:
    """One model's mean activations over the evaluation prompts: `[n_layers + 1, hidden]` per position."""

    prompt_last: torch.Tensor
    response_avg: torch.Tensor | None
    answers: list[dict]


def folder_identity(spec: str) -> str:
    """Names, sizes and modification times of a local folder's files, hashed: a retrained model at the same
    path is a different run. A hub id is its own identity."""
    import hashlib

    path = Path(spec)
    if not path.is_dir():
        return spec
    digest = hashlib.sha256()
    for f in sorted(path.iterdir()):
        if f.is_file():
            stat = f.stat()
            digest.update(f"{f.name}:{stat.st_size}:{stat.st_mtime_ns};".encode())
    return digest.hexdigest()[:16]


def is_adapter(path: str | Path) -> bool:
    return (Path(path) / "adapter_config.json").is_file()


def _read_json(path: Path) -> dict:
    try:
        data = json.loads(read_text(path))
    except json.JSONDecodeError as exc:
        raise PersonavecError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict):
        raise PersonavecError(f"{path}: expected a JSON object")
    return data


def attach_adapter(base_model, adapter_dir: str | Path, base_spec: str):
    """Load a peft adapter onto `base_model` (in place), refusing one made for another base model."""
    from peft import PeftModel

    adapter_dir = Path(adapter_dir)
    meta_path = adapter_dir / ADAPTER_META
    if meta_path.is_file():
        meta = _read_json(meta_path)
        if meta.get("base_fingerprint") and meta["base_fingerprint"] != model_fingerprint(base_model):
            raise PersonavecError(f"{adapter_dir}: adapter was trained on {meta.get('base_model', 'another model')!r}, "
                                  f"not on --base {base_spec} (model fingerprints differ)")
    else:
        recorded = _read_json(adapter_dir / "adapter_config.json").get("base_model_name_or_path")
        if recorded and recorded not in (base_spec, resolve(base_spec)):
            warnings.warn(f"{adapter_dir}: adapter records base model {recorded!r}, loading it on {base_spec!r}",
                          stacklevel=2)
    try:
        model = PeftModel.from_pretrained(base_model, str(adapter_dir))
    except (RuntimeError, ValueError, KeyError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise PersonavecError(f"{adapter_dir}: adapter does not fit --base {base_spec}: {first[:200]}") from None
    return model.eval()


def side_means(model, tokenizer, questions: list[str], answers: list[dict] | None, batch_size: int = 16) -> SideMeans:
    """Mean last-prompt-token activations over `questions` and, given `answers` (rows with "question" and
    "answer"), the mean response activations over them, at every layer."""
    prompts = [user_chat(q) for q in questions]
    last = capture(model, tokenizer, prompts, positions=("prompt_last",), batch_size=batch_size, show_progress=False)
    response = None
    if answers:
        chats = [user_chat(r["question"]) + [{"role": "assistant", "content": r["answer"]}] for r in answers
                 if r["answer"].strip()]
        if chats:
            response = capture(model, tokenizer, chats, positions=("response_avg",), batch_size=batch_size,
                               show_progress=False).response_avg.mean(0)
    return SideMeans(prompt_last=last.prompt_last.mean(0), response_avg=response, answers=answers or [])


def shift_by_layer(base: SideMeans, finetuned: SideMeans, vector: PersonaVector) -> dict[str, dict[str, list[float]]]:
    """Per position: the projection of (fine-tuned - base) on the vector, and its cosine with it, at every layer."""
    out = {}
    for position in ("prompt_last", "response_avg"):
        a, b = getattr(finetuned, position), getattr(base, position)
        if a is None or b is None:
            continue
        difference = a - b
        out[position] = {"projection": layerwise_projection(difference, vector.vectors).tolist(),
                         "cosine": cosine(difference, vector.vectors).tolist()}
    return out


def _answers(run: RunDir, name: str, model, tokenizer, questions: list[str], cfg: ShiftConfig) -> list[dict]:
    items = [{"id": f"{name}-q{q}", "model": name, "question": question} for q, question in enumerate(questions)]
    return generate_missing(run, "answers.jsonl", model, tokenizer, items, lambda it: user_chat(it["question"]), cfg)


def _mean(values) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def run_shift(cfg: ShiftConfig, trait: Trait, vector: PersonaVector, base_model, tokenizer, judge, out: str | Path,
              force: bool = False, dtype: str = "auto", finetuned_model=None) -> dict:
    """Measure the shift; the fine-tuned side is `finetuned_model` if given, else loaded from `cfg.finetuned`
    (an adapter is attached to `base_model` in place, after the base side is measured)."""
    vector.check_model(base_model)
    layer = vector.check_layer(cfg.layer)
    run = RunDir(out, {**cfg.as_config(), "layer": layer, "finetuned_identity": folder_identity(cfg.finetuned)},
                 force=force, resume_keys=cfg.resume_keys)
    questions = list(trait.eval_questions[: cfg.questions or len(trait.eval_questions)])
    generate_answers = cfg.responses or judge is not None

    base_answers = _answers(run, "base", base_model, tokenizer, questions, cfg) if generate_answers else None
    base = side_means(base_model, tokenizer, questions, base_answers if cfg.responses else None, cfg.batch_size)
    if finetuned_model is None:
        if is_adapter(cfg.finetuned):
            finetuned_model = attach_adapter(base_model, cfg.finetuned, cfg.base)
        else:
            finetuned_model, _ = load_model(cfg.finetuned, dtype=dtype)
            vector.check_model(finetuned_model)
    ft_answers = _answers(run, "finetuned", finetuned_model, tokenizer, questions, cfg) if generate_answers else None
    finetuned = side_means(finetuned_model, tokenizer, questions, ft_answers if cfg.responses else None, cfg.batch_size)

    per_layer = shift_by_layer(base, finetuned, vector)
    summary = {"trait": trait.name, "base": cfg.base, "finetuned": cfg.finetuned, "layer": layer,
               "n_questions": len(questions), "judge": cfg.judge,
               "shift": {p: v["projection"][layer] for p, v in per_layer.items()},
               "cosine": {p: v["cosine"][layer] for p, v in per_layer.items()},
               "per_layer": per_layer}
    if judge is not None:
        rows = (base_answers or []) + (ft_answers or [])
        judge_rows(judge, trait, rows)
        scores = {side: {"trait": _mean(r["trait_score"] for r in rows if r["model"] == side),
                         "coherence": _mean(r["coherence"] for r in rows if r["model"] == side)}
                  for side in ("base", "finetuned")}
        summary["scores"] = scores
        b, f = scores["base"]["trait"], scores["finetuned"]["trait"]
        summary["trait_score_change"] = None if b is None or f is None else f - b
        write_jsonl(run.file("judged.jsonl"), rows)
    run.write_json("summary.json", summary)
    _write_report(run.file("report.html"), summary, base_answers, ft_answers)
    return summary


def _write_report(path: Path, summary: dict, base_answers, ft_answers) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.2))
    for position, values in summary["per_layer"].items():
        ax.plot(range(len(values["projection"])), values["projection"], marker="o", ms=3, label=position)
    ax.axvline(summary["layer"], color="tab:red", ls="--", lw=1, label=f"vector layer {summary['layer']}")
    ax.axhline(0, color="k", lw=0.5)
    ax.set_xlabel("layer (0 = embeddings, i = output of block i)")
    ax.set_ylabel("shift projected on the vector")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    headers = ["position", "projected shift", "cosine"]
    table = [[p, summary["shift"][p], summary["cosine"][p]] for p in summary["shift"]]
    sections = [("Shift along the persona vector", figure_html(fig, "projected shift per layer")
                 + table_html(headers, table))]
    if "scores" in summary:
        s = summary["scores"]
        sections.append(("Judged trait score", table_html(
            ["model", "trait", "coherence"],
            [["base", s["base"]["trait"], s["base"]["coherence"]],
             ["finetuned", s["finetuned"]["trait"], s["finetuned"]["coherence"]],
             ["change", summary["trait_score_change"], None]])))
    if base_answers and ft_answers:
        sections.append(("Answers", table_html(["question", "base", "finetuned"],
                                               [[b["question"], b["answer"], f["answer"]]
                                                for b, f in list(zip(base_answers, ft_answers))[:6]])))
    write_report(path, f"personavec shift: {summary['trait']}, {summary['finetuned']} vs {summary['base']}", sections)
