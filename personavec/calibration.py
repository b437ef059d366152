"""How well a judge separates trait-showing answers from others, and where to put its threshold.

Small judges rank well but compress the scale (Qwen2.5-Coder-1.5B gives 57-62 to
clearly rude answers and 49-52 to polite ones), so the paper's fixed threshold of
50 does not transfer. `calibrate` runs a judge on the built-in calibration set
(`personavec/data/judge_calibration.jsonl`: 12 labelled answers per built-in
trait) and reports, per trait and per scoring scheme (``judge.scoring.SCHEMES``),
the AUROC, each class's score range and a recommended threshold: the midpoint
between the two class means. Each trait's entry also names the scheme that
separates best there (highest AUROC; ties go to the larger standardised gap
between the class means, then to the earlier scheme in ``SCHEMES``), and carries
that scheme's numbers at its top level, so a calibration file reads as before.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
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


def data_file(name: str) -> Path:
    return Path(str(resources.files("personavec") / "data" / name))


def calibration_items(traits: Sequence[str] | None = None, path: str | Path | None = None,
                      require_trait: bool = True, language: str | None = None) -> list[dict]:
    """The labelled calibration answers, optionally only for some traits, or one `language` (an item without
    a ``"language"`` field is English)."""
    source = Path(path) if path else data_file("judge_calibration.jsonl")
    if not source.is_file():
        raise PersonavecError(f"{source}: calibration set not found")
    items = []
    for number, item in iter_jsonl(source):
        need = {"trait", "question", "answer", "label"} if require_trait else {"question", "answer", "label"}
        if not isinstance(item, dict) or not need <= set(item):
            raise PersonavecError(f"{source}:{number}: need a JSON object with {', '.join(sorted(need))}")
        if language is None or item.get("language", "en") == language:
            items.append(item)
    if traits:
        known = {item["trait"] for item in items}
        missing = [t for t in traits if t not in known]
        if missing:
            raise PersonavecError(f"no calibration answers for trait(s) {', '.join(missing)}; "
                                  f"the set covers {', '.join(sorted(known))}")
        items = [item for item in items if item["trait"] in traits]
    return items


def _pooled_sd(pos: Sequence[float], neg: Sequence[float]) -> float | None:
    def var(xs):
        m = sum(xs) / len(xs)
        return sum((x - m) ** 2 for x in xs) / len(xs)

    if not pos or not neg:
        return None
    return ((var(pos) + var(neg)) / 2) ** 0.5


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
        "pooled_sd": _pooled_sd(pos, neg),
        "n": len(labels),
        "n_unscored": len(labels) - len(pairs),
    }


def separation(summary: dict) -> float:
    """(pos mean - neg mean) / pooled sd of the class ranges' spread: the tie-break between schemes."""
    if summary.get("pos_mean") is None or summary.get("neg_mean") is None:
        return float("-inf")
    gap = summary["pos_mean"] - summary["neg_mean"]
    spread = summary.get("pooled_sd") or 0.0
    return gap / spread if spread > 0 else (float("inf") if gap > 0 else float("-inf"))


def best_scheme(by_scheme: dict[str, dict]) -> str:
    """The scheme with the highest AUROC (ties: larger standardised gap, then the earlier scheme)."""
    order = list(by_scheme)
    return max(order, key=lambda s: (by_scheme[s]["auroc"] if by_scheme[s]["auroc"] is not None else -1.0,
                                     separation(by_scheme[s]), -order.index(s)))


def usable_schemes(trait, schemes: Sequence[str] | None = None) -> list[str]:
    """`schemes` (default: every scheme) that `trait` can be judged with (yes/no ones need its question)."""
    from .judge.scoring import SCHEMES, get_scheme

    names = list(schemes) if schemes else list(SCHEMES)
    for name in names:
        get_scheme(name)
    if schemes:  # asked for by name: a missing yes/no question is an error naming the trait file
        for name in names:
            if SCHEMES[name].needs_yes_no:
                trait.require_yes_no(name)
        return names
    return [n for n in names if not SCHEMES[n].needs_yes_no or trait.yes_no_question]


def score_labelled(judge, items: Sequence[dict], schemes: Sequence[str] | None = None, progress=None,
                   trait_files: dict | None = None) -> dict[str, dict[str, list]]:
    """Trait scores of labelled items under each usable scheme: ``{trait: {scheme: [score, ...]}}``."""
    from .judge import score_items
    from .traits import load_trait

    out: dict[str, dict[str, list]] = {}
    for name in dict.fromkeys(item["trait"] for item in items):
        trait = (trait_files or {}).get(name) or load_trait(name)
        rows = [item for item in items if item["trait"] == name]
        pairs = [(item["question"], item["answer"]) for item in rows]
        out[name] = {s: score_items(judge, trait, pairs, s, progress=progress) for s in usable_schemes(trait, schemes)}
    return out


def calibrate(judge, traits: Sequence[str] | None = None, progress=None, path: str | Path | None = None,
              schemes: Sequence[str] | None = None, trait_files: dict | None = None,
              language: str | None = None) -> dict:
    """Run `judge` on the calibration set under each scheme.

    Returns ``{"judge": spec, "identity": fingerprint or URL, "traits": {name: {**best scheme's summary,
    "scheme": best, "schemes": {scheme: summary}}}}``. `schemes` (default: every scheme the trait can use;
    naming a yes/no scheme for a trait without a yes/no question is an error naming its file).
    `trait_files` maps a trait name to a :class:`Trait` to use instead of the built-in one; `language` keeps only
    the items in that language.
    """
    items = calibration_items(traits, path, language=language)
    scored = score_labelled(judge, items, schemes, progress, trait_files)
    result = {"judge": judge.spec, "identity": getattr(judge, "identity", None), "traits": {}}
    for name, by_scheme in scored.items():
        labels = [item["label"] for item in items if item["trait"] == name]
        summaries = {s: summarize(labels, scores) for s, scores in by_scheme.items()}
        best = best_scheme(summaries)
        result["traits"][name] = {**summaries[best], "scheme": best, "schemes": summaries}
    return result


def calibration_calls(items: int, schemes: Sequence[str] | None = None) -> int:
    """Judge calls of :func:`calibrate` over `items` items (an upper bound: every scheme)."""
    from .judge.scoring import SCHEMES

    return items * sum(len(SCHEMES[s].readouts) for s in (schemes or SCHEMES))


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


# ---------------------------------------------------------------- which scheme and thresholds a command uses


def scheme_of(entry: dict | None) -> str:
    """The scheme a calibration entry was made with (files written before schemes existed: score100)."""
    from .judge.scoring import DEFAULT_SCHEME

    return (entry or {}).get("scheme") or DEFAULT_SCHEME


def packaged_choices(path: str | Path | None = None) -> dict:
    """``personavec/data/judge_choices.json``: per packaged judge spec and trait, the scheme and threshold
    chosen on the calibration set (``{"judges": {spec: {"identity", "traits": {name: entry}}}}``)."""
    source = Path(path) if path else data_file("judge_choices.json")
    if not source.is_file():
        return {"judges": {}}
    return json.loads(source.read_text(encoding="utf-8"))


def default_scheme(judge_spec: str, trait, choices: dict | None = None) -> str:
    """The scheme for `trait` when nothing else says: the packaged choice for this judge, else score100."""
    from .judge.scoring import DEFAULT_SCHEME, SCHEMES

    entry = (choices or packaged_choices())["judges"].get(judge_spec, {}).get("traits", {}).get(trait.name)
    scheme = scheme_of(entry) if entry else DEFAULT_SCHEME
    if SCHEMES[scheme].needs_yes_no and not trait.yes_no_question:
        return DEFAULT_SCHEME  # a same-named trait file of the user's without a yes/no question
    return scheme


def check_calibration_judge(calibration: dict, judge, where: str) -> None:
    """Refuse a calibration file made with another judge (spec or weights), naming both."""
    made, identity = calibration.get("judge"), calibration.get("identity")
    if made is not None and made != judge.spec:
        raise PersonavecError(f"{where}: calibration made with judge {made}, not {judge.spec}; run: personavec "
                              f"judge-check --judge {judge.spec} --save FILE")
    mine = getattr(judge, "identity", None)
    if identity and mine and identity != mine:
        raise PersonavecError(f"{where}: calibration made with judge {made} at {identity}, not {judge.spec} at "
                              f"{mine}; run: personavec judge-check --judge {judge.spec} --save FILE")


def entry_for_scheme(calibration: dict, trait: str, scheme: str | None, where: str) -> dict | None:
    """The calibration entry for `trait` under `scheme` (default: the file's choice); a file that did not
    measure that scheme is refused, naming both schemes."""
    entry = calibration.get("traits", {}).get(trait)
    if entry is None:
        return None
    chosen = scheme_of(entry)
    if scheme is None or scheme == chosen:
        return {**entry, "scheme": chosen}
    other = (entry.get("schemes") or {}).get(scheme)
    if other is None:
        raise PersonavecError(f"{where}: calibrated {trait!r} with scheme {chosen}, not {scheme}; drop --scheme or "
                              f"run judge-check --save again")
    return {**other, "scheme": scheme}


def self_calibration_path(judge, trait, schemes: Sequence[str], items: Sequence[dict]) -> Path:
    """Where a self-calibration is cached: by judge spec and fingerprint, trait, schemes and the exact prompts."""
    import hashlib

    from .cache import cache_dir
    from .judge.scoring import COHERENCE_RUBRIC, YES_NO_DESCRIPTION, YES_NO_TEMPLATE

    material = json.dumps([judge.spec, getattr(judge, "identity", ""), trait.to_dict(), list(schemes),
                           [[i["question"], i["answer"], i["label"]] for i in items],
                           YES_NO_TEMPLATE, YES_NO_DESCRIPTION, COHERENCE_RUBRIC], ensure_ascii=False)
    digest = hashlib.sha256(material.encode()).hexdigest()[:20]
    return cache_dir() / "calibrations" / f"{trait.name}-{digest}.json"


def labelled_items_path(language: str = "en") -> Path:
    """Where the labelled answers for self-calibration are: the English set, or the multilingual one whose items
    carry ``"language"`` (``personavec/data/multilingual/judge_calibration.jsonl``)."""
    return data_file("judge_calibration.jsonl" if language == "en" else "multilingual/judge_calibration.jsonl")


def self_calibrate(judge, trait, scheme: str | None = None, progress=None) -> tuple[dict | None, bool]:
    """Calibrate `judge` on `trait`'s built-in labelled items (every usable scheme, or only `scheme`), once:
    the result is cached by judge fingerprint, trait and schemes. Returns ``(calibration or None when the
    trait has no labelled items, whether it came from the cache)``.

    A trait in another language (``"language"`` in its file) is calibrated only on labelled answers in that
    language, never on the English ones: the judge's scale depends on the language it reads."""
    language = getattr(trait, "language", "en")
    source = labelled_items_path(language)
    if not source.is_file():
        return None, False
    items = [i for i in calibration_items(path=source, language=language) if i["trait"] == trait.name]
    if not items:
        return None, False
    schemes = usable_schemes(trait, [scheme] if scheme else None)
    path = self_calibration_path(judge, trait, schemes, items)
    if path.is_file():
        try:
            return json.loads(path.read_text(encoding="utf-8")), True
        except (OSError, ValueError):
            pass  # a torn cache file: calibrate again
    result = calibrate(judge, [trait.name], progress=progress, schemes=schemes, trait_files={trait.name: trait},
                       path=source, language=language)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_calibration(path, result)
    return result, False


@dataclass
class JudgePlan:
    """Which scheme a command judges a trait with, and the threshold that goes with it (None: none known)."""

    scheme: str
    threshold: float | None
    source: str
    auroc: float | None = None
    calibration: dict | None = None

    def line(self, judge_spec: str, trait: str) -> str:
        threshold = "no calibrated threshold" if self.threshold is None else f"threshold {self.threshold:.1f}"
        auc = "" if self.auroc is None else f", AUROC {self.auroc:.2f}"
        return f"judge {judge_spec} for {trait}: scheme {self.scheme}, {threshold} ({self.source}{auc})"


def plan_judging(judge, trait, *, calibration_path: str | Path | None = None, scheme: str | None = None,
                 calibrate_self: bool = True, progress=None, flag: str = "--calibration") -> JudgePlan:
    """The scheme and threshold a command uses to judge `trait` with `judge`.

    1. ``calibration_path`` (``judge-check --save``): refused when made with another judge or when it did not
       measure `scheme`; its choice (or `scheme`'s figures) otherwise.
    2. A local judge with ``calibrate_self`` on a trait that has built-in labelled items: a self-calibration on
       them (:func:`self_calibrate`, cached).
    3. Otherwise `scheme`, else the packaged choice for this judge (:func:`default_scheme`), with no threshold:
       the caller falls back to the paper's 50 and warns (:func:`warn_if_uncalibrated`).
    """
    from .judge.scoring import get_scheme

    if scheme is not None:
        get_scheme(scheme)
        if get_scheme(scheme).needs_yes_no:
            trait.require_yes_no(scheme)
    spec = judge.spec
    if calibration_path is not None:
        calibration = read_calibration(calibration_path)
        check_calibration_judge(calibration, judge, str(calibration_path))
        entry = entry_for_scheme(calibration, trait.name, scheme, str(calibration_path))
        if entry is not None:
            return JudgePlan(entry["scheme"], entry.get("threshold"), f"from {calibration_path}", entry.get("auroc"),
                             calibration)
        return JudgePlan(scheme or default_scheme(spec, trait), None, f"{calibration_path} has no {trait.name!r}",
                         None, calibration)
    if calibrate_self and spec.startswith("local:"):
        calibration, cached = self_calibrate(judge, trait, scheme, progress)
        if calibration is not None:
            entry = calibration["traits"][trait.name]
            n = entry.get("n")
            how = "self-calibration, cached" if cached else "self-calibration, now cached"
            return JudgePlan(entry["scheme"], entry.get("threshold"), f"{how}, on the trait's {n} labelled answers",
                             entry.get("auroc"), calibration)
    return JudgePlan(scheme or default_scheme(spec, trait), None, "not calibrated")
