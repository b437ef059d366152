"""How well a judge separates trait-showing answers from others, and where to put its threshold.

Small judges rank well but compress the scale (Qwen2.5-Coder-1.5B gives 57-62 to
clearly rude answers and 49-52 to polite ones), so the paper's fixed threshold of
50 does not transfer. `calibrate` runs a judge on the built-in calibration set
(`personavec/data/judge_calibration.jsonl`: 12 labelled answers per built-in
trait) and reports, per trait, the AUROC, each class's score range and a
recommended threshold: the midpoint between the two class means.
"""

from __future__ import annotations

import json
from importlib import resources
from pathlib import Path
from typing import Sequence

from .atomic import atomic_write
from .chat import iter_jsonl, read_text
from .errors import PersonavecError
from .vecmath import auroc  # noqa: F401  (re-exported: the judge check reports it)

MIN_AUROC = 0.8


def midpoint_threshold(pos_scores: Sequence[float], neg_scores: Sequence[float]) -> float | None:
    """Midpoint between the class means; None when either class is empty."""
    if not pos_scores or not neg_scores:
        return None
    return (sum(pos_scores) / len(pos_scores) + sum(neg_scores) / len(neg_scores)) / 2


def calibration_items(traits: Sequence[str] | None = None, path: str | Path | None = None) -> list[dict]:
    """The labelled calibration answers, optionally only for some traits."""
    source = Path(path) if path else Path(str(resources.files("personavec") / "data" / "judge_calibration.jsonl"))
    if not source.is_file():
        raise PersonavecError(f"{source}: calibration set not found")
    items = []
    for number, item in iter_jsonl(source):
        if not {"trait", "question", "answer", "label"} <= set(item):
            raise PersonavecError(f"{source}:{number}: need a JSON object with trait, question, answer, label")
        items.append(item)
    if traits:
        known = {item["trait"] for item in items}
        missing = [t for t in traits if t not in known]
        if missing:
            raise PersonavecError(f"no calibration answers for trait(s) {', '.join(missing)}; "
                                  f"the set covers {', '.join(sorted(known))}")
        items = [item for item in items if item["trait"] in traits]
    return items


def summarize(labels: Sequence[int], scores: Sequence[float | None]) -> dict:
    """Per-trait numbers from labels and judge scores (None scores are counted, not used)."""
    pairs = [(y, s) for y, s in zip(labels, scores) if s is not None]
    pos = [s for y, s in pairs if y]
    neg = [s for y, s in pairs if not y]
    auc = auroc([y for y, _ in pairs], [s for _, s in pairs])
    return {
        "auroc": auc,
        "threshold": midpoint_threshold(pos, neg),
        "pos_range": [min(pos), max(pos)] if pos else None,
        "neg_range": [min(neg), max(neg)] if neg else None,
        "pos_mean": sum(pos) / len(pos) if pos else None,
        "neg_mean": sum(neg) / len(neg) if neg else None,
        "n": len(labels),
        "n_unscored": len(labels) - len(pairs),
    }


def calibrate(judge, traits: Sequence[str] | None = None, progress=None, path: str | Path | None = None) -> dict:
    """Run `judge` on the calibration set: ``{"judge": spec, "traits": {name: summary}}``."""
    from .traits import load_trait

    items = calibration_items(traits, path)
    names = list(dict.fromkeys(item["trait"] for item in items))
    prompts = [load_trait(item["trait"]).rubric_prompt(item["question"], item["answer"]) for item in items]
    scores = judge.score(prompts, progress=progress)
    result = {"judge": judge.spec, "traits": {}}
    for name in names:
        rows = [(item["label"], s) for item, s in zip(items, scores) if item["trait"] == name]
        result["traits"][name] = summarize([y for y, _ in rows], [s for _, s in rows])
    return result


def write_calibration(path: str | Path, calibration: dict) -> Path:
    text = json.dumps(calibration, indent=2) + "\n"
    return atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def read_calibration(path: str | Path) -> dict:
    path = Path(path)
    if not path.exists():
        raise PersonavecError(f"{path}: calibration file not found")
    try:
        data = json.loads(read_text(path))  # folders and non-UTF-8 bytes are one-line errors there
    except json.JSONDecodeError as exc:
        raise PersonavecError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    if not isinstance(data, dict) or not isinstance(data.get("traits"), dict):
        raise PersonavecError(f"{path}: not a calibration file (written by `personavec judge-check --save`)")
    return data


def threshold_for(calibration: dict | None, trait: str, default: float = 50.0) -> float:
    """The calibrated threshold for `trait`, else `default` (the paper's 50)."""
    entry = (calibration or {}).get("traits", {}).get(trait) or {}
    return entry.get("threshold") if entry.get("threshold") is not None else default


def warn_if_uncalibrated(judge_spec: str, trait: str, calibration: dict | None) -> bool:
    """Warn loudly on stderr when a judge's scores for `trait` should not be trusted for filtering.

    Warns when there is no calibration for the trait, when it was made with
    another judge, or when the judge's AUROC on the calibration set is below 0.8.
    Returns True when it warned.
    """
    from rich.console import Console

    console = Console(stderr=True, soft_wrap=True)
    entry = (calibration or {}).get("traits", {}).get(trait)
    hint = f"run: personavec judge-check --judge {judge_spec} --traits {trait} --save calibration.json"
    if calibration is None or entry is None:
        console.print(f"[bold yellow]warning:[/] judge {judge_spec} is not calibrated for trait {trait!r}; "
                      f"a fixed threshold of 50 may not suit it ({hint})")
        return True
    if calibration.get("judge") not in (None, judge_spec):
        console.print(f"[bold yellow]warning:[/] the calibration was made with judge {calibration.get('judge')}, "
                      f"not {judge_spec} ({hint})")
        return True
    auc = entry.get("auroc")
    if auc is None or auc < MIN_AUROC:
        shown = "n/a" if auc is None else f"{auc:.2f}"
        console.print(f"[bold red]WARNING: judge {judge_spec} separates {trait!r} poorly (AUROC {shown} < "
                      f"{MIN_AUROC}); filtering on its scores will keep the wrong answers. "
                      f"Use a stronger judge (e.g. --judge openai:<model>).[/]")
        return True
    return False
