"""Cross-source generalisation: does a trait vector recognise its trait in text written in registers it never saw?

Rows are vector sources, columns the hand-written test sets in `benchmarks/data/generalisation/`
(`<trait>_<register>.jsonl`: the same question answered with and without the trait, in the same register and at a
similar length; never used to make or tune anything). Each cell is an AUROC of label 1 over label 0:

- at the vector's own layer, then in parentheses the best layer for that test set (an oracle: chosen on the test
  set itself, so it says what the direction family could reach, not what a user would get);
- for the response projection (`screen`'s `response_projection`) and, in a second table, the approximate projection
  difference (`screen --approx`: response projection minus the last prompt token's).

Vector sources, per trait:
- `extract`: the vector shipped for the model (`personavec/data/vectors/<model>/<trait>.safetensors`), when present;
  `--vector [TRAIT:]NAME=PATH` adds any vector file (its `trait` metadata names the trait unless TRAIT: is given);
- from an extract run's answers (`--extract-run TRAIT=DIR`, or found at `runs/vectors/<model>/<trait>/extract/` where
  `personavec vectors build` leaves them), no generation: `extract-pca` (paired-difference PCA on the kept pairs),
  and the mean difference of other selections of its pairs: `extract-unfiltered` (every pair, no judge filter),
  `extract-top-gap` (the half with the largest judged pos - neg trait score) and `extract-len-matched` (kept pairs
  whose answers are within 25% in token length);
- `vector`: mean difference of `experiments/data/<trait>_train.jsonl` vs `neutral_train.jsonl` (what
  `personavec vector` makes from them, with its layer choice), and `vector-pca` on the same pairs;
- `screen-set`: the same from `experiments/data/screen_labelled.jsonl`'s pairs for the trait, and `screen-set-pca`;
- `mean(...)`: the mean of the mean-difference sources' unit vectors (`vecmath.average_directions`), at the first
  source's layer;
- `+style`: a source with the register directions of `style_pairs.jsonl` (trait-free answers, each content in five
  registers) projected out at every layer; `+style-ho` holds out the column's own register from those directions,
  so the column's register is never one the projection knew.

Derived sources keep their base's layer. `answer length` is a baseline row: the AUROC of the answer's token count.
`in-set oracle (split half)` is a ceiling row (`check.split_half_ceiling`): a mean difference made from half of the
test set's own pairs, scored on the other half, at its best layer; no vector made elsewhere is expected above it.
Everything comes from one capture per file at every layer (`personavec.pipeline.check`), the readings `screen` uses;
`--verify` re-scores one cell through `screen_records` and prints both.

Usage: python benchmarks/bench_generalisation.py [--model qwen2.5-coder-0.5b] [--traits optimistic,humorous,impolite]
       [--vector [TRAIT:]NAME=PATH ...] [--extract-run TRAIT=DIR ...] [--no-shipped] [--json OUT] [--verify]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from personavec.activations import capture
from personavec.chat import encode_chat, read_chats
from personavec.errors import PersonavecError
from personavec.models import load_model
from personavec.pipeline.check import aurocs_by_layer, best_layer, capture_for_check, read_check_files, \
    split_half_ceiling
from personavec.pipeline.contrast import middle_layers, separation_by_layer
from personavec.pipeline.extract import item_chat
from personavec.vecmath import auroc, average_directions, cosine, group_directions, mean_difference, \
    paired_difference_pca, remove_directions
from personavec.vectors import PersonaVector

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "generalisation"
EXPERIMENTS = ROOT / "experiments" / "data"
READINGS = {"response_projection": "response projection", "approx_projection_difference": "approx ΔP (screen --approx)"}


@dataclass
class Source:
    name: str
    layer: int
    vectors: torch.Tensor  # [n_layers + 1, hidden]
    origin: str
    kind: str = "mean-difference"  # or "pca", "mean", "style"
    per_register: Callable[[str], torch.Tensor] | None = None  # a column-dependent vector (style held out)
    note: str = ""

    def for_register(self, register: str) -> torch.Tensor:
        return self.per_register(register) if self.per_register else self.vectors


@dataclass
class TestSet:
    register: str
    path: Path
    records: list
    labels: list[int]
    acts: object = None
    lengths: list[int] = field(default_factory=list)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# -- capture helpers ------------------------------------------------------------------------------------------

def paired_acts(model, tok, pos_chats, neg_chats, batch_size):
    """Response-average activations at every layer for matched pos/neg chats (a pair with a skipped chat goes)."""
    pos = capture(model, tok, pos_chats, positions=("response_avg",), batch_size=batch_size, show_progress=False)
    neg = capture(model, tok, neg_chats, positions=("response_avg",), batch_size=batch_size, show_progress=False)
    drop = set(pos.skipped) | set(neg.skipped)
    keep = torch.tensor([i for i in range(len(pos_chats)) if i not in drop], dtype=torch.long)
    return pos, neg, pos.response_avg[keep], neg.response_avg[keep]


def contrast_sources(name, origin, model, tok, pos_chats, neg_chats, batch_size, trait) -> list[Source]:
    """Mean difference (with `personavec vector`'s layer choice) and paired PCA of matched pos/neg chats."""
    log(f"{trait}: {name} from {origin} ({len(pos_chats)} pairs)")
    pos, neg, p, n = paired_acts(model, tok, pos_chats, neg_chats, batch_size)
    vector = PersonaVector.from_activations(pos, neg, model=model, trait=trait)
    seps = separation_by_layer(vector, pos.kept(), neg.kept())
    layer = max(middle_layers(vector.n_layers), key=lambda i: seps[i])
    return [Source(name, layer, vector.vectors, origin, note=f"{len(p)} pairs"),
            Source(f"{name}-pca", layer, paired_difference_pca(p, n), origin, kind="pca", note=f"{len(p)} pairs")]


def train_pairs(trait: str, experiments: Path = EXPERIMENTS):
    pos_path, neg_path = experiments / f"{trait}_train.jsonl", experiments / "neutral_train.jsonl"
    if not pos_path.exists() or not neg_path.exists():
        return None
    pos = {r.fields["id"]: r.messages for r in read_chats(pos_path, require_response=True)}
    neg = {r.fields["id"]: r.messages for r in read_chats(neg_path, require_response=True)}
    ids = [i for i in pos if i in neg]
    return [pos[i] for i in ids], [neg[i] for i in ids], f"{_short(pos_path)} vs {neg_path.name}"


def screen_set_pairs(trait: str, experiments: Path = EXPERIMENTS):
    path = experiments / "screen_labelled.jsonl"
    if not path.exists():
        return None
    rows = [r for r in read_chats(path, require_response=True) if r.fields.get("trait") == trait]
    pos = {r.fields["id"].rsplit("-", 1)[0]: r.messages for r in rows if r.fields.get("label") == 1}
    neg = {r.fields["id"].rsplit("-", 1)[0]: r.messages for r in rows if r.fields.get("label") == 0}
    ids = [i for i in pos if i in neg]
    if not ids:
        return None
    return [pos[i] for i in ids], [neg[i] for i in ids], f"{_short(path)} ({trait} pairs)"


def _short(path: Path) -> str:
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def extract_run_pairs(folder: Path) -> list[dict]:
    """Every complete pos/neg pair of an extract run (`judged.jsonl`), kept by its filter or not."""
    judged = folder / "judged.jsonl"
    if not judged.exists():
        raise PersonavecError(f"--extract-run {folder}: no judged.jsonl there (give an extract run folder)")
    rows = [json.loads(line) for line in judged.read_text(encoding="utf-8").splitlines() if line.strip()]
    by_pair: dict[str, dict] = {}
    for row in rows:
        by_pair.setdefault(row["pair"], {})[row["polarity"]] = row
    pairs = [p for p in by_pair.values() if "pos" in p and "neg" in p and p["pos"]["answer"].strip()
             and p["neg"]["answer"].strip()]
    if not any(p["pos"].get("kept") for p in pairs):
        raise PersonavecError(f"--extract-run {folder}: no kept pair in judged.jsonl")
    return pairs


def judged_gap(pair: dict) -> float | None:
    pos, neg = pair["pos"].get("trait_score"), pair["neg"].get("trait_score")
    return None if pos is None or neg is None else pos - neg


# -- the sources --------------------------------------------------------------------------------------------------

def parse_assignments(values: list[str], flag: str) -> list[tuple[str | None, str, str]]:
    out = []
    for value in values:
        if "=" not in value:
            raise PersonavecError(f"{flag} {value!r}: give NAME=PATH (or TRAIT:NAME=PATH)")
        left, path = value.split("=", 1)
        trait, _, name = left.rpartition(":")
        out.append((trait or None, name, path))
    return out


def base_sources(args, model, tok, trait: str) -> list[Source]:
    from personavec.shipped import shipped_vectors

    sources: list[Source] = []
    given = parse_assignments(args.vector, "--vector")
    files = []
    if not args.no_shipped and not any(n == "extract" for _, n, _ in given):
        files += [("extract", v.path) for v in shipped_vectors() if v.model == args.model and v.trait == trait]
    for t, name, path in given:
        vector = PersonaVector.load(path)
        if (t or vector.trait) == trait:
            files.append((name, Path(path)))
        elif not (t or vector.trait):
            raise PersonavecError(f"--vector {name}={path}: the file records no trait; write TRAIT:{name}={path}")
    for name, path in files:
        vector = PersonaVector.load(path)
        vector.check_model(model)
        if vector.layer is None:
            raise PersonavecError(f"--vector {name}={path}: records no layer")
        sources.append(Source(name, vector.layer, vector.vectors, str(path), note=f"{vector.n_pos}+{vector.n_neg} answers"))

    runs = {}
    for value in args.extract_run:
        if "=" not in value:
            raise PersonavecError(f"--extract-run {value!r}: give TRAIT=DIR")
        name, folder = value.split("=", 1)
        runs[name] = Path(folder)
    run = runs.get(trait)
    auto = Path("runs/vectors") / args.model / trait / "extract"
    shipped = any(name == "extract" for name, _ in files) and not any(n == "extract" for _, n, _ in given)
    if run is None and not args.extract_run and shipped and (auto / "judged.jsonl").exists():
        run = auto  # where `personavec vectors build` made the shipped vector
    if run is not None:
        sources += extract_run_sources(run, sources, model, tok, trait, args.batch_size)

    for name, found in (("vector", train_pairs(trait, args.experiments)),
                        ("screen-set", screen_set_pairs(trait, args.experiments))):
        if found:
            pos_chats, neg_chats, origin = found
            sources += contrast_sources(name, origin, model, tok, pos_chats, neg_chats, args.batch_size, trait)
    return sources


def extract_run_sources(run: Path, sources: list[Source], model, tok, trait: str, batch_size: int) -> list[Source]:
    """From an extract run's pairs (no generation): paired PCA on the kept pairs, and the mean difference over
    other selections of its pairs: all of them (no judge filter), the half with the largest judged trait gap, and
    the kept pairs whose two answers have about the same length."""
    pairs = extract_run_pairs(run)
    log(f"{trait}: extract variants from {run} ({len(pairs)} pairs, {sum(bool(p['pos'].get('kept')) for p in pairs)} "
        "kept)")
    _, _, p, n = paired_acts(model, tok, [item_chat(x["pos"]) for x in pairs], [item_chat(x["neg"]) for x in pairs],
                                 batch_size)
    if len(p) < len(pairs):
        raise PersonavecError(f"--extract-run {run}: some answers are longer than the model's context")
    extract = next((s for s in sources if s.name == "extract"), None)
    layer = extract.layer if extract else json.loads((run / "summary.json").read_text())["layer"]
    kept = [i for i, x in enumerate(pairs) if x["pos"].get("kept")]
    if extract is not None:
        again = mean_difference(p[kept], n[kept])
        log(f"{trait}: the kept pairs' mean difference has cosine {float(cosine(again[layer], extract.vectors[layer])):.4f} "
            f"with `extract` at layer {layer}")
    out = [Source("extract-pca", layer, paired_difference_pca(p[kept], n[kept]), str(run), kind="pca",
                  note=f"{len(kept)} kept pairs")]
    selections = {"extract-unfiltered": (list(range(len(pairs))), "every pair, no judge filter")}
    gaps = [(judged_gap(x), i) for i, x in enumerate(pairs) if judged_gap(x) is not None]
    if len(gaps) >= 4:
        top = [i for _, i in sorted(gaps, reverse=True)[: len(gaps) // 2]]
        selections["extract-top-gap"] = (top, f"the {len(top)} of {len(gaps)} judged pairs with the largest trait gap")
    lengths = [(len(tok(x["pos"]["answer"])["input_ids"]), len(tok(x["neg"]["answer"])["input_ids"])) for x in pairs]
    matched = [i for i in kept if max(lengths[i]) <= 1.25 * min(lengths[i])]
    if len(matched) >= 2:
        selections["extract-len-matched"] = (matched, f"{len(matched)} of {len(kept)} kept pairs within 25% in length")
    for name, (rows, note) in selections.items():
        out.append(Source(name, layer, mean_difference(p[rows], n[rows]), str(run), kind="subset", note=note))
    return out


def derived_sources(sources: list[Source], style: dict[str, torch.Tensor] | None) -> list[Source]:
    out = list(sources)
    plain = [s for s in sources if s.kind == "mean-difference"]
    if len(plain) >= 2:
        mean = Source(f"mean({','.join(s.name for s in plain)})", plain[0].layer,
                      average_directions([s.vectors for s in plain]), "average_directions", kind="mean")
        out.append(mean)
        plain.append(mean)
    if style:
        everything = group_directions(list(style.values()))
        for s in plain:
            out.append(Source(f"{s.name}+style", s.layer, remove_directions(s.vectors, everything), s.origin,
                              kind="style"))

            def held_out(register, vectors=s.vectors):
                groups = [acts for name, acts in style.items() if name != register]
                return remove_directions(vectors, group_directions(groups))

            out.append(Source(f"{s.name}+style-ho", s.layer, s.vectors, s.origin, kind="style", per_register=held_out))
    return out


# -- scoring and printing -----------------------------------------------------------------------------------------

def score(sources: list[Source], sets: list[TestSet]) -> dict:
    table = {}
    for s in sources:
        row = {"layer": s.layer, "origin": s.origin, "kind": s.kind, "note": s.note, "cells": {}}
        for t in sets:
            by_layer = aurocs_by_layer(t.acts, t.labels, s.for_register(t.register))
            cell = {}
            for reading in READINGS:
                best, value = best_layer(by_layer[reading])
                cell[reading] = {"auroc": by_layer[reading][s.layer], "best_layer": best, "best_auroc": value,
                                 "by_layer": by_layer[reading]}
            row["cells"][t.register] = cell
        table[s.name] = row
    return table


def fmt(value) -> str:
    return "-" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.2f}"


def render(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for k, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip())
        if k == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def print_trait(trait: str, table: dict, sets: list[TestSet], baseline: dict[str, float | None],
                ceiling: dict[str, dict]) -> None:
    registers = [t.register for t in sets]
    for reading, title in READINGS.items():
        print(f"\n{trait}: AUROC of {title}, at the vector's layer (best layer on that test set: AUROC@layer)")
        rows = [["source", "layer"] + registers + ["mean"]]
        for name, row in table.items():
            cells = [row["cells"][r][reading] for r in registers]
            at = [c["auroc"] for c in cells]
            best = [c["best_auroc"] for c in cells]
            mean_at = sum(at) / len(at) if None not in at else None
            mean_best = sum(best) / len(best) if None not in best else None
            rows.append([name, str(row["layer"])]
                        + [f"{fmt(c['auroc'])} ({fmt(c['best_auroc'])}@{c['best_layer']})" for c in cells]
                        + [f"{fmt(mean_at)} ({fmt(mean_best)})"])
        rows.append(["answer length (tokens)", "-"] + [fmt(baseline[r]) for r in registers] + [""])
        if reading == "response_projection":
            rows.append(["in-set oracle (split half)", "-"]
                        + [f"- ({fmt(ceiling[r]['best_auroc'])}@{ceiling[r]['best_layer']})" for r in registers] + [""])
        print(render(rows))
    sizes = ", ".join(f"{t.register} {sum(t.labels)}+{len(t.labels) - sum(t.labels)}" for t in sets)
    print(f"({trait} test sets, label 1 + label 0 answers: {sizes})")


def verify(model, tok, source: Source, t: TestSet, table: dict, batch_size: int) -> None:
    from personavec.pipeline.screen import ScreenConfig, screen_records

    vector = PersonaVector(vectors=source.for_register(t.register), layer=source.layer)
    personas, _ = screen_records(model, tok, t.records, vector, ScreenConfig(layer=source.layer, approx=True,
                                                                             batch_size=batch_size), show_progress=False)
    for reading in READINGS:
        values = [p[reading] for p in personas]
        pairs = [(y, v) for y, v in zip(t.labels, values) if v is not None]
        via_screen = auroc([y for y, _ in pairs], [v for _, v in pairs])
        here = table[source.name]["cells"][t.register][reading]["auroc"]
        print(f"verify {source.name} on {t.register}, {reading}: screen_records {via_screen:.4f}, this table {here:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--traits", default="optimistic,humorous,impolite")
    parser.add_argument("--vector", action="append", default=[], metavar="[TRAIT:]NAME=PATH")
    parser.add_argument("--extract-run", action="append", default=[], metavar="TRAIT=DIR",
                        help="an extract run folder whose kept pairs feed extract-pca")
    parser.add_argument("--no-shipped", action="store_true", help="do not pick up the shipped extract vectors")
    parser.add_argument("--no-style", action="store_true", help="leave out the +style rows")
    parser.add_argument("--data", type=Path, default=DATA, help="the test sets and style_pairs.jsonl")
    parser.add_argument("--experiments", type=Path, default=EXPERIMENTS,
                        help="where <trait>_train.jsonl, neutral_train.jsonl and screen_labelled.jsonl are")
    parser.add_argument("--json", type=Path, default=None, help="default runs/bench_generalisation/<model>.json")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--verify", action="store_true", help="re-score the first cell of each trait with screen_records")
    args = parser.parse_args()

    try:
        run(args)
    except PersonavecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def run(args) -> None:
    traits = [t.strip() for t in args.traits.split(",") if t.strip()]
    files = {trait: sorted(args.data.glob(f"{trait}_*.jsonl")) for trait in traits}
    for trait, paths in files.items():
        if not paths:
            raise PersonavecError(f"--traits {trait}: no test sets {args.data}/{trait}_*.jsonl")
    checks = {trait: read_check_files(paths, flag="--data") for trait, paths in files.items()}  # before the model
    model, tok = load_model(args.model, dtype=args.dtype)
    n_layers = model.config.num_hidden_layers
    log(f"{args.model}: {n_layers} layers")

    style = None
    style_path = args.data / "style_pairs.jsonl"
    if not args.no_style and style_path.exists():
        records = read_chats(style_path, require_response=True)
        acts = capture(model, tok, [r.messages for r in records], positions=("response_avg",),
                       batch_size=args.batch_size, show_progress=False)
        registers = sorted({r.fields["register"] for r in records})
        style = {reg: acts.response_avg[[i for i, r in enumerate(records) if r.fields["register"] == reg
                                         and i not in set(acts.skipped)]] for reg in registers}
        log(f"style pairs: {len(records)} answers in registers {', '.join(registers)}")

    result = {"model": args.model, "n_layers": n_layers, "traits": {}}
    for trait in traits:
        sources = derived_sources(base_sources(args, model, tok, trait), style)
        if not sources:
            log(f"{trait}: no vector source (no shipped vector, no --vector, no experiments data); skipped")
            continue
        sets = []
        for path in files[trait]:
            records, labels = checks[trait][str(path)]
            register = path.stem[len(trait) + 1:]
            t = TestSet(register, path, records, labels)
            log(f"{trait}: capturing {path.name} ({len(records)} answers)")
            t.acts = capture_for_check(model, tok, records, args.batch_size)
            t.lengths = [encode_chat(tok, r.messages).response_len for r in records]
            sets.append(t)
        table = score(sources, sets)
        baseline = {t.register: auroc(t.labels, t.lengths) for t in sets}
        ceiling = {}
        for t in sets:
            by_layer = split_half_ceiling(t.acts, t.labels, [r.fields["pair"] for r in t.records])
            layer, value = best_layer(by_layer)
            ceiling[t.register] = {"best_layer": layer, "best_auroc": value, "by_layer": by_layer}
        print_trait(trait, table, sets, baseline, ceiling)
        for s in sources:
            if s.origin:
                log(f"  {s.name}: {s.origin}" + (f" ({s.note})" if s.note else ""))
        if args.verify:
            verify(model, tok, sources[0], sets[0], table, args.batch_size)
        result["traits"][trait] = {"test_sets": {t.register: {"path": str(t.path), "n": len(t.labels),
                                                              "n_label_1": sum(t.labels)} for t in sets},
                                   "length_baseline": baseline, "split_half_ceiling": ceiling, "sources": table}
    out = args.json or Path("runs/bench_generalisation") / f"{args.model.replace('/', '_')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1), encoding="utf-8")
    print(f"\njson: {out}")


if __name__ == "__main__":
    main()
