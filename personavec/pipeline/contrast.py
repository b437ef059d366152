"""A persona vector from contrastive chats the user already has (no generation, no judge).

Also the default demo: build an `optimistic` vector on the packaged model from
the small built-in contrastive set, then show steered answers both ways.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from ..activations import capture
from ..chat import ChatRecord, check_responses, read_chats, user_chat, write_jsonl
from ..errors import PersonavecError, arg
from ..generate import generate
from ..backends import as_backend
from ..report import figure_html, layer_plot, table_html, write_report
from ..runs import RunDir
from ..vecmath import project, separation
from ..vectors import PersonaVector

VECTOR_POSITIONS = ("response_avg", "prompt_avg", "prompt_last")


def separation_by_layer(vector: PersonaVector, pos, neg, position: str = "response_avg") -> list[float]:
    """Cohen's d between pos and neg projections onto v[L], for every layer."""
    pos_acts, neg_acts = pos.at(position), neg.at(position)
    rows = vector.at(position)
    return [separation(project(pos_acts[:, layer], rows[layer]), project(neg_acts[:, layer], rows[layer]))
            if rows[layer].norm() > 0 else 0.0 for layer in range(rows.shape[0])]


def middle_layers(total: int) -> list[int]:
    """Candidate steering layers: the middle half of the model, where persona vectors steer best."""
    low, high = max(1, total // 4), max(1, (3 * total) // 4)
    return list(range(low, high + 1))


def contrastive_vector(model, tokenizer, pos: list, neg: list, position: str = "response_avg",
                       trait: str = "", batch_size: int = 16, show_progress: bool = True) -> tuple[PersonaVector, list[float]]:
    """Mean-difference vectors at every layer, with a recommended layer by pos/neg separation (middle half).

    `pos` and `neg` are chats (message lists) or `ChatRecord`s (then messages name their file and line). Chats
    longer than the model's context are skipped with a warning that lists them: they are neither in the means nor
    in `n_pos` / `n_neg`, and `extra["skipped"]` records them. A side left with no chat is an error.
    """
    if position not in VECTOR_POSITIONS:
        raise PersonavecError(f"{arg('position', repr(position))}: use one of {', '.join(VECTOR_POSITIONS)}")
    positions = VECTOR_POSITIONS if position == "response_avg" else ("prompt_avg", "prompt_last")
    acts, skipped = {}, {}
    for side, chats in (("pos", pos), ("neg", neg)):
        if not chats:
            raise PersonavecError(f"{arg(side)}: no chats given")
        messages = [c.messages if isinstance(c, ChatRecord) else c for c in chats]
        captured = capture(model, tokenizer, messages, positions=positions, batch_size=batch_size,
                           show_progress=show_progress)
        if captured.skipped:
            labels = [chats[i].where if isinstance(chats[i], ChatRecord) else f"#{i + 1}" for i in captured.skipped]
            limit = as_backend(model).context_length
            listing = ", ".join(labels[:10]) + (f" and {len(labels) - 10} more" if len(labels) > 10 else "")
            if len(labels) == len(chats):
                raise PersonavecError(f"every {side} chat is longer than the model's context ({limit} tokens): "
                                      f"{listing}; nothing is left to average")
            warnings.warn(f"skipped {len(labels)} of {len(chats)} {side} chats longer than the model's context "
                          f"({limit} tokens), not in the mean: {listing}", stacklevel=2)
            skipped[side] = labels
        acts[side] = captured.kept()
    pos_acts, neg_acts = acts["pos"], acts["neg"]
    vector = PersonaVector.from_activations(pos_acts, neg_acts, model=model, trait=trait)
    if skipped:
        vector.extra["skipped"] = skipped
    if position != "response_avg":
        vector.vectors, vector.position = vector.at(position), position
    seps = separation_by_layer(vector, pos_acts, neg_acts, position)
    candidates = middle_layers(as_backend(model).n_layers)
    vector.layer = max(candidates, key=lambda layer: seps[layer])
    vector.extra["layer_method"] = "max pos/neg separation (Cohen's d) over the middle half of the layers"
    return vector, seps


def read_contrast_files(pos_path: str, neg_path: str, position: str) -> tuple[list[ChatRecord], list[ChatRecord]]:
    need_response = position == "response_avg"
    pos, neg = read_chats(pos_path, require_response=need_response), read_chats(neg_path, require_response=need_response)
    if need_response:
        for records in (pos, neg):
            check_responses(records, "response_avg averages the answer's tokens")
    return pos, neg


# -- the demo ------------------------------------------------------------------

DEMO_PROMPTS = (
    "How do you feel about starting a new job next week?",
    "What do you think the next ten years will bring?",
    "My team lost the final match today. Any thoughts?",
    "I'm thinking about learning to swim as an adult.",
)


def builtin_contrast() -> tuple[list[list[dict]], list[list[dict]]]:
    path = resources.files("personavec") / "data" / "demo_optimism.jsonl"
    with resources.as_file(path) as real:
        records = read_chats(real, require_response=True)
    pos = [r.messages for r in records if r.fields.get("polarity") == "pos"]
    neg = [r.messages for r in records if r.fields.get("polarity") == "neg"]
    return pos, neg


@dataclass
class DemoResult:
    out: Path
    layer: int
    rows: list[dict]


def run_steering_demo(model, tokenizer, out: str | Path, coef: float = 0.3, max_new_tokens: int = 48,
                      force: bool = False, model_name: str = "") -> DemoResult:
    """Extract the built-in `optimistic` vector and answer a few prompts at -coef, 0 and +coef (norm-relative)."""
    config = {"command": "demo", "model": model_name, "coef": coef, "coef_mode": "norm", "max_new_tokens": max_new_tokens,
              "contrast_set": "builtin:demo_optimism"}
    run = RunDir(out, config, force=force)
    pos, neg = builtin_contrast()
    vector, seps = contrastive_vector(model, tokenizer, pos, neg, trait="optimistic")
    vector.model, vector.coef, vector.coef_mode = model_name, coef, "norm"
    vector.save(run.file("vectors.safetensors"))
    chats = [user_chat(p) for p in DEMO_PROMPTS]
    rows = []
    for c in (-coef, 0.0, coef):
        with vector.apply(model, coef=c, coef_mode="norm"):
            answers = generate(model, tokenizer, chats, max_new_tokens=max_new_tokens, show_progress=False)
        rows += [{"coef": c, "prompt": p, "answer": a} for p, a in zip(DEMO_PROMPTS, answers)]
    write_jsonl(run.file("answers.jsonl"), rows)
    summary = {"layer": vector.layer, "coef": coef, "coef_mode": "norm", "n_pos": vector.n_pos, "n_neg": vector.n_neg,
               "separation_by_layer": seps, "layer_method": vector.extra["layer_method"]}
    run.write_json("summary.json", summary)
    fig = layer_plot(list(range(len(seps))), seps, "Cohen's d (pos vs neg)", "pos/neg separation per layer", vector.layer)
    by_prompt = [[p] + [next(r["answer"] for r in rows if r["prompt"] == p and r["coef"] == c) for c in (-coef, 0.0, coef)]
                 for p in DEMO_PROMPTS]
    write_report(run.file("report.html"), f"personavec demo: optimistic on {model_name}", [
        ("Per-layer separation", figure_html(fig, "separation per layer")),
        (f"Steered answers at layer {vector.layer}",
         table_html(["prompt", f"coef {-coef} (suppress)", "coef 0", f"coef {coef} (amplify)"], by_prompt)),
    ])
    return DemoResult(out=run.path, layer=vector.layer, rows=rows)
