"""The paper's preventative-steering experiment at CPU scale.

Four LoRA fine-tunes of one model on matched data (the same 240 everyday
questions, see experiments/data/):
  neutral     - neutral answers;
  trait       - plainly optimistic answers;
  trait+steer - optimistic answers, with the optimistic vector added during training only;
  trait+caft  - optimistic answers, with the vector's direction projected out during training.
Then, for the base model and each variant: the judged trait score on the trait's
20 evaluation questions, the `shift` projection (last prompt token and response
mean, at the vector's layer), and multiple-choice capability.

Every stage resumes (fine-tunes from checkpoints, answers and judge scores from
their run folders and caches), so a rerun only redoes what is missing.

Usage:
  python experiments/preventative_steering.py --vector runs/extract-optimistic/vectors.safetensors \
      [--model qwen2.5-coder-0.5b] [--judge local:qwen2.5-coder-1.5b] [--out runs/experiment-optimistic]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from personavec.chat import read_chats
from personavec.judge import make_judge
from personavec.models import load_model
from personavec.pipeline.evaluate import capability_items, mc_accuracy
from personavec.pipeline.finetune import FinetuneConfig, run_finetune
from personavec.pipeline.shift import ShiftConfig, attach_adapter, run_shift
from personavec.report import figure_html, table_html, write_report
from personavec.runs import RunDir
from personavec.traits import load_trait
from personavec.vectors import PersonaVector

DATA = Path(__file__).parent / "data"
VARIANTS = ("neutral", "trait", "trait+steer", "trait+caft")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vector", required=True)
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--judge", default="local:qwen2.5-coder-1.5b")
    parser.add_argument("--trait", default="optimistic")
    parser.add_argument("--trait-data", default=str(DATA / "optimistic_train.jsonl"))
    parser.add_argument("--neutral-data", default=str(DATA / "neutral_train.jsonl"))
    parser.add_argument("--out", default="runs/experiment-optimistic")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--coef", type=float, default=None, help="preventative coefficient (default: the vector's)")
    parser.add_argument("--coef-mode", default=None, help="raw | norm (default: the vector's)")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    args = parser.parse_args()

    out = Path(args.out)
    vector = PersonaVector.load(args.vector)
    trait = load_trait(args.trait)
    coef = vector.coef if args.coef is None else args.coef
    coef_mode = args.coef_mode or vector.coef_mode
    data = {"neutral": read_chats(args.neutral_data, require_response=True),
            "trait": read_chats(args.trait_data, require_response=True)}
    run = RunDir(out, {"command": "experiment", "model": args.model, "vector": args.vector, "trait": trait.name,
                       "judge": args.judge, "epochs": args.epochs, "lr": args.lr, "coef": coef, "coef_mode": coef_mode,
                       "layer": vector.layer})

    adapters = {}
    for variant in VARIANTS:
        source = "neutral" if variant == "neutral" else "trait"
        extra = {}
        if variant == "trait+steer":
            extra = dict(steer=args.vector, coef=coef, coef_mode=coef_mode, layer=vector.layer)
        elif variant == "trait+caft":
            extra = dict(ablate=args.vector, layer=vector.layer)
        cfg = FinetuneConfig(model=args.model, data=str(args.neutral_data if source == "neutral" else args.trait_data),
                             epochs=args.epochs, learning_rate=args.lr, **extra)
        folder = out / f"finetune-{variant.replace('+', '-')}"
        if (folder / "adapter" / "adapter_model.safetensors").exists() and (folder / "summary.json").exists():
            adapters[variant] = folder / "adapter"
            continue
        model, tokenizer = load_model(args.model)
        print(f"== fine-tuning {variant}", flush=True)
        result = run_finetune(cfg, data[source], model, tokenizer, folder,
                              vector=vector if (cfg.steer or cfg.ablate) else None)
        adapters[variant] = result.adapter
        del model

    judge = make_judge(args.judge)
    items = capability_items()
    rows = []
    base_model, tokenizer = load_model(args.model)
    rows.append({"variant": "base", "capability": mc_accuracy(base_model, tokenizer, items)})
    for variant in VARIANTS:
        print(f"== evaluating {variant}", flush=True)
        base_model, tokenizer = load_model(args.model)
        tuned = attach_adapter(load_model(args.model)[0], adapters[variant], args.model)
        cfg = ShiftConfig(base=args.model, finetuned=str(adapters[variant]), vector=args.vector, trait=trait.name,
                          judge=args.judge, max_new_tokens=args.max_new_tokens)
        s = run_shift(cfg, trait, vector, base_model, tokenizer, judge, out / f"shift-{variant.replace('+', '-')}",
                      finetuned_model=tuned)
        if rows[0].get("trait_score") is None:
            rows[0].update(trait_score=s["scores"]["base"]["trait"], coherence=s["scores"]["base"]["coherence"],
                           shift_prompt_last=0.0, shift_response_avg=0.0)
        rows.append({"variant": variant, "trait_score": s["scores"]["finetuned"]["trait"],
                     "coherence": s["scores"]["finetuned"]["coherence"],
                     "shift_prompt_last": s["shift"]["prompt_last"], "shift_response_avg": s["shift"]["response_avg"],
                     "capability": mc_accuracy(tuned, tokenizer, items)})
        del base_model, tuned

    summary = {"model": args.model, "trait": trait.name, "layer": vector.layer, "coef": coef, "coef_mode": coef_mode,
               "judge": args.judge, "capability_items": len(items), "results": rows}
    run.write_json("summary.json", summary)
    table = _markdown(rows)
    (out / "results.md").write_text(table + "\n")
    _report(out / "report.html", summary)
    print(table)
    print(f"report: {out / 'report.html'}")


def _markdown(rows: list[dict]) -> str:
    lines = ["| variant | trait score | coherence | shift (last prompt token) | shift (response mean) | capability |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['variant']} | {r['trait_score']:.1f} | {r['coherence']:.1f} | {r['shift_prompt_last']:+.2f} "
                     f"| {r['shift_response_avg']:+.2f} | {r['capability']:.0%} |")
    return "\n".join(lines)


def _report(path: Path, summary: dict) -> None:
    import matplotlib.pyplot as plt

    rows = summary["results"]
    names = [r["variant"] for r in rows]
    fig, axes = plt.subplots(1, 3, figsize=(12, 3.4))
    panels = (("trait_score", f"judged {summary['trait']} score"), ("shift_response_avg", "shift along the vector "
              "(response mean)"), ("capability", "multiple-choice accuracy"))
    colors = ["0.6", "tab:blue", "tab:red", "tab:green", "tab:purple"]
    for ax, (key, label) in zip(axes, panels):
        ax.bar(names, [r[key] for r in rows], color=colors[: len(rows)])
        ax.set_title(label, fontsize=9)
        ax.tick_params(axis="x", rotation=30, labelsize=8)
        ax.axhline(0, color="k", lw=0.5)
    fig.tight_layout()
    headers = ["variant", "trait score", "coherence", "shift (last prompt token)", "shift (response mean)", "capability"]
    write_report(path, f"Preventative steering: {summary['trait']} on {summary['model']}", [
        ("Results", figure_html(fig, "trait score, shift and capability per variant") + table_html(
            headers, [[r["variant"], r["trait_score"], r["coherence"], r["shift_prompt_last"], r["shift_response_avg"],
                       r["capability"]] for r in rows])),
        ("Setup", f"<pre>{json.dumps({k: v for k, v in summary.items() if k != 'results'}, indent=2)}</pre>"),
    ])


if __name__ == "__main__":
    main()
