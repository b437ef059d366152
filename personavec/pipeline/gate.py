"""`personavec gate`: refuse a release candidate whose persona moved too far.

For each trait, the fine-tuning shift of the candidate against the base model
(see `shift`), at the layer recorded in that trait's vector, and with a judge
the change in judged trait score. Limits:
- `max_shift`: on the *relative* shift, the projected shift divided by the
  vector's length at that layer. 1.0 means the candidate moved as far as the
  whole difference between trait-showing and trait-free answers, so 0.1 is a
  tenth of it; this makes one limit meaningful across models and traits.
- `max_score_increase`: on the judged trait score (0-100 points).
A trait fails when either limit is crossed; the gate fails when any trait does.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import PersonavecError
from ..report import figure_html, table_html, write_report
from ..runs import RunDir
from ..traits import load_trait
from ..vectors import PersonaVector
from .shift import ShiftConfig, run_shift


def find_vector(vectors_dir: str | Path, trait: str) -> Path:
    """`DIR/<trait>.safetensors`, `DIR/<trait>/vectors.safetensors` or `DIR/extract-<trait>/vectors.safetensors`."""
    root = Path(vectors_dir)
    candidates = [root / f"{trait}.safetensors", root / trait / "vectors.safetensors",
                  root / f"extract-{trait}" / "vectors.safetensors"]
    for path in candidates:
        if path.is_file():
            return path
    raise PersonavecError(f"--vectors {root}: no vector for trait {trait!r} (looked for "
                          f"{', '.join(str(p.relative_to(root)) for p in candidates)})")


@dataclass
class GateLimits:
    max_shift: float | None = None
    max_score_increase: float | None = None

    def check(self, judged: bool) -> None:
        if self.max_shift is None and self.max_score_increase is None:
            raise PersonavecError("give --max-shift and/or --max-score-increase: the gate needs a limit")
        if self.max_score_increase is not None and not judged:
            raise PersonavecError("--max-score-increase needs --judge")


def trait_verdict(result: dict, limits: GateLimits) -> list[str]:
    """One-line reasons this trait fails (empty: it passes)."""
    reasons = []
    if limits.max_shift is not None and result["relative_shift"] > limits.max_shift:
        reasons.append(f"{result['trait']}: shift {result['relative_shift']:+.3f} of the vector's length at layer "
                       f"{result['layer']} exceeds --max-shift {limits.max_shift:g}")
    change = result.get("trait_score_change")
    if limits.max_score_increase is not None and change is not None and change > limits.max_score_increase:
        reasons.append(f"{result['trait']}: judged score rose by {change:+.1f} points, more than "
                       f"--max-score-increase {limits.max_score_increase:g}")
    return reasons


def run_gate(base: str, candidate: str, traits: list[str], vectors_dir: str | Path, limits: GateLimits,
             base_model, candidate_model, tokenizer, judge, judge_spec: str, out: str | Path, questions: int | None = None,
             batch_size: int = 16, force: bool = False) -> dict:
    """Measure every trait, write `gate.json` and `report.html` under `out`, return the verdict."""
    limits.check(judge is not None)
    if not traits:
        raise PersonavecError("--traits: give at least one trait")
    loaded = []
    for name in traits:  # every input is checked before any model work
        trait = load_trait(name)
        path = find_vector(vectors_dir, trait.name)
        vector = PersonaVector.load(path)
        vector.check_model(base_model)
        loaded.append((trait, path, vector))
    out = Path(out)
    run = RunDir(out, {"command": "gate", "base": base, "candidate": candidate, "traits": traits,
                       "vectors": str(vectors_dir), "judge": judge_spec, "questions": questions,
                       "max_shift": limits.max_shift, "max_score_increase": limits.max_score_increase},
                 force=force, resume_keys=("batch_size", "max_shift", "max_score_increase"))
    results, failures = [], []
    for trait, path, vector in loaded:
        cfg = ShiftConfig(base=base, finetuned=candidate, vector=str(path), trait=trait.name, judge=judge_spec,
                          questions=questions, responses=judge is not None, batch_size=batch_size)
        s = run_shift(cfg, trait, vector, base_model, tokenizer, judge, out / trait.name, force=force,
                      finetuned_model=candidate_model)
        length = float(vector.vectors[s["layer"]].norm())
        result = {"trait": trait.name, "vector": str(path), "layer": s["layer"], "shift": s["shift"]["prompt_last"],
                  "relative_shift": s["shift"]["prompt_last"] / length, "vector_length": length,
                  "trait_score_change": s.get("trait_score_change"), "scores": s.get("scores")}
        result["reasons"] = trait_verdict(result, limits)
        result["passed"] = not result["reasons"]
        failures += result["reasons"]
        results.append(result)
    verdict = {"passed": not failures, "failures": failures, "base": base, "candidate": candidate,
               "limits": {"max_shift": limits.max_shift, "max_score_increase": limits.max_score_increase},
               "traits": results}
    run.write_json("gate.json", verdict)
    run.write_json("summary.json", verdict)
    _write_report(run.file("report.html"), verdict)
    return verdict


def _write_report(path: Path, verdict: dict) -> None:
    import matplotlib.pyplot as plt

    results = verdict["traits"]
    fig, ax = plt.subplots(figsize=(6, 3))
    colors = ["tab:green" if r["passed"] else "tab:red" for r in results]
    ax.bar([r["trait"] for r in results], [r["relative_shift"] for r in results], color=colors)
    if verdict["limits"]["max_shift"] is not None:
        ax.axhline(verdict["limits"]["max_shift"], color="k", ls="--", lw=1, label="--max-shift")
        ax.legend(fontsize=8)
    ax.axhline(0, color="k", lw=0.5)
    ax.set_ylabel("shift / vector length")
    ax.set_title("PASSED" if verdict["passed"] else "FAILED")
    rows = [[r["trait"], "pass" if r["passed"] else "FAIL", r["layer"], r["shift"], r["relative_shift"],
             r["trait_score_change"], "; ".join(r["reasons"])] for r in results]
    write_report(path, f"personavec gate: {verdict['candidate']} against {verdict['base']}", [
        ("Verdict", figure_html(fig, "relative shift per trait") + table_html(
            ["trait", "verdict", "layer", "projected shift", "relative shift", "judged score change", "reason"], rows)),
    ])
