"""Vectors that ship inside the package: `personavec/data/vectors/<model short name>/<trait>.safetensors`, each with
its run summary `<trait>.json`. `make vectors` (`personavec vectors build`) regenerates them; `--trait NAME` on
monitor, screen, steer and shift uses them."""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from .errors import PersonavecError

# Settings that fit 2 CPU cores (~5 min per trait with the local 1.5B judge); recorded in every shipped summary.
BUILD_SETTINGS = {"questions": 10, "samples_per_question": 1, "max_new_tokens": 64, "sweep_questions": 4,
                  "batch_size": 20, "evaluate_questions": 5, "evaluate_max_new_tokens": 64}
BUILD_MODELS = ("qwen2.5-coder-0.5b", "smollm2-135m")
BUILD_JUDGE = "local:qwen2.5-coder-1.5b"
# The steering curve (evaluate at -a/0/+a) is run for these models only: it is what the README table reports.
CURVE_MODELS = ("qwen2.5-coder-0.5b",)


def shipped_root() -> Path:
    return Path(str(resources.files("personavec") / "data" / "vectors"))


@dataclass(frozen=True)
class ShippedVector:
    model: str
    trait: str
    path: Path

    @property
    def summary_path(self) -> Path:
        return self.path.with_suffix(".json")

    def summary(self) -> dict:
        return json.loads(self.summary_path.read_text(encoding="utf-8")) if self.summary_path.exists() else {}


def shipped_vectors(root: Path | None = None) -> list[ShippedVector]:
    root = root or shipped_root()
    if not root.is_dir():
        return []
    return [ShippedVector(model=f.parent.name, trait=f.stem, path=f)
            for f in sorted(root.glob("*/*.safetensors"))]


def shipped_vector_path(model: str, trait: str, root: Path | None = None) -> Path:
    """The shipped file for (`model`, `trait`); the error lists what does ship."""
    available = shipped_vectors(root)
    for v in available:
        if v.model == model and v.trait == trait:
            return v.path
    listing = "; ".join(f"{m}: {', '.join(v.trait for v in available if v.model == m)}"
                        for m in dict.fromkeys(v.model for v in available)) or "none"
    raise PersonavecError(f"--trait {trait}: no vector ships for model {model!r}; shipped vectors: {listing} "
                          f"(or pass --vector FILE)")


def packaged_fingerprint(model: str) -> str:
    """The weights fingerprint of a packaged model, read from its converted files without loading the model."""
    from transformers import AutoConfig

    from .models import folder_fingerprint, resolve

    path = resolve(model)
    config = AutoConfig.from_pretrained(path)
    text = getattr(config, "text_config", None) or config
    return folder_fingerprint(path, config, int(text.num_hidden_layers))


def check_shipped(vector, model: str, trait: str) -> None:
    """Refuse a shipped vector on weights other than the ones it was made on (a plain vector file only warns:
    it may be meant for a fine-tune; a shipped one is for the packaged model and nothing else)."""
    actual = packaged_fingerprint(model)
    if vector.fingerprint and vector.fingerprint != actual:
        raise PersonavecError(f"--trait {trait}: the vector shipped for {model} was made on weights with fingerprint "
                              f"{vector.fingerprint}, but {model}'s files here have {actual}; pass --vector FILE "
                              "made on this model (or `make vectors` to rebuild)")


def load_shipped(model: str, trait: str, root: Path | None = None):
    """The shipped vector for (`model`, `trait`), checked against the packaged model's weights fingerprint before
    anything loads the model."""
    from .vectors import PersonaVector

    vector = PersonaVector.load(shipped_vector_path(model, trait, root))
    check_shipped(vector, model, trait)
    return vector


def _stderr(message: str) -> None:
    import sys

    print(message, file=sys.stderr, flush=True)


def _is_current(entry: ShippedVector, judge_spec: str, fingerprint: str) -> bool:
    """A shipped vector made with today's settings and judge, on these weights."""
    from .vectors import PersonaVector

    if not (entry.path.exists() and entry.summary_path.exists()):
        return False
    try:
        record = entry.summary()
        made_on = PersonaVector.load(entry.path).fingerprint
    except (ValueError, OSError, PersonavecError):
        return False  # unreadable: made again
    return record.get("settings") == BUILD_SETTINGS and record.get("judge") == judge_spec and made_on == fingerprint


def build_shipped_vectors(models: list[str], traits: list[str], work: Path, root: Path | None = None,
                          judge_spec: str = BUILD_JUDGE, force: bool = False, log=_stderr,
                          rebuild: bool = False) -> list[Path]:
    """Extract every (model, trait) with the default judge into `work/<model>/<trait>/`, resuming finished and
    half-finished runs, then copy each vector and its summary into the package. Returns the shipped files.

    A vector already in `root` with today's `BUILD_SETTINGS`, the same judge and the packaged weights' fingerprint
    is kept as it is (its run folder may be long gone), unless `rebuild`."""
    from .backends import load_backend
    from .calibration import plan_judging
    from .judge import make_judge
    from .pipeline.evaluate import EvaluateConfig, run_evaluate
    from .pipeline.extract import ExtractConfig, run_extract
    from .traits import load_trait

    root = root or shipped_root()
    s = BUILD_SETTINGS
    judge, shipped = None, []
    for model in models:
        todo = traits
        if not rebuild:  # after a lost `work` folder, only what is missing or stale is made again
            fingerprint = packaged_fingerprint(model)
            todo = [name for name in traits if not _is_current(
                ShippedVector(model, name, root / model / f"{name}.safetensors"), judge_spec, fingerprint)]
            for name in traits:
                if name not in todo:
                    log(f"== {model} / {name}: up to date in {root / model} (same settings, judge and weights; "
                        "--rebuild makes it again)")
        if not todo:
            continue
        judge = judge or make_judge(judge_spec)  # loaded only when something is built
        backend = load_backend(model, "hf")
        for name in todo:
            trait = load_trait(name)
            log(f"== {model} / {name}")
            plan = plan_judging(judge, trait, calibrate_self=True)
            log(plan.line(judge_spec, name))
            threshold = plan.threshold if plan.threshold is not None else 50.0
            cfg = ExtractConfig(model=model, trait=name, judge=judge_spec, questions=s["questions"],
                                samples_per_question=s["samples_per_question"], max_new_tokens=s["max_new_tokens"],
                                sweep_questions=s["sweep_questions"], batch_size=s["batch_size"],
                                pos_threshold=threshold, neg_threshold=threshold, judge_scheme=plan.scheme)
            run = work / model / name
            try:
                result = run_extract(cfg, trait, backend, backend.tokenizer, judge, run / "extract", force=force,
                                     judge_calibration=plan.calibration)
            except PersonavecError as e:  # e.g. every pair filtered out: that trait does not ship for this model
                log(f"   {model} / {name}: not shipped: {e}")
                continue
            summary = json.loads((run / "extract" / "summary.json").read_text(encoding="utf-8"))
            curve = None
            if model in CURVE_MODELS:
                c = result.vector.coef
                ecfg = EvaluateConfig(model=model, trait=name, vector=str(run / "extract" / "vectors.safetensors"),
                                      judge=judge_spec, coefs=[-c, 0.0, c], questions=s["evaluate_questions"],
                                      max_new_tokens=s["evaluate_max_new_tokens"], batch_size=s["batch_size"],
                                      baseline=False, judge_scheme=plan.scheme)
                curve = run_evaluate(ecfg, trait, result.vector, backend, backend.tokenizer, judge,
                                     run / "evaluate", force=force)["per_coef"]
            dest = root / model
            dest.mkdir(parents=True, exist_ok=True)
            tmp = dest / f".{name}.safetensors.tmp"
            shutil.copyfile(run / "extract" / "vectors.safetensors", tmp)
            record = {"model": model, "trait": name, "judge": judge_spec, "judge_scheme": plan.scheme,
                      "thresholds": {"pos": threshold, "neg": threshold}, "settings": s,
                      "layer": summary["layer"], "coef": summary["coef"], "coef_mode": summary["coef_mode"],
                      "counts": summary["counts"], "layer_sweep": summary["layer_sweep"], "steering_curve": curve,
                      "made_by": "personavec vectors build (make vectors)"}
            (dest / f"{name}.json").write_text(json.dumps(record, indent=1) + "\n", encoding="utf-8")
            tmp.replace(dest / f"{name}.safetensors")
            shipped.append(dest / f"{name}.safetensors")
            log(f"   shipped {dest / f'{name}.safetensors'}: layer {summary['layer']}, "
                f"{summary['counts']['pairs_kept']} of {summary['counts']['pairs']} pairs kept")
        del backend
    return shipped
