"""Does a persona vector extracted in one language read the trait in others?

For each vector file, its trait's labelled multilingual answers
(`personavec/data/multilingual/<trait>.jsonl`: the same question answered once with the trait,
label 1, and once without, label 0, in English, Japanese, Chinese and Spanish) are scored with
`personavec.pipeline.screen.screen_records`, the code behind `personavec screen`, and the AUROC
of each score against the label is reported per language:

- `response_projection`: the answer's mean activation at layer L projected on v̂[L];
- `approx_projection_difference`: the same minus the last prompt token's projection (no generation);
- `projection_difference` (the paper's ΔP, against the model's own greedy answer), with `--full` only.

With two or more vectors of the same trait (e.g. one extracted from the English trait file and one
from `personavec/data/multilingual/optimistic.ja.json`), it also prints their cosine at each layer used.
Everything is written to `--out` as JSON; the table is printed as markdown.

Usage:
  python experiments/multilingual.py --model qwen2.5-coder-0.5b \\
      --vector en=personavec/data/vectors/qwen2.5-coder-0.5b/optimistic.safetensors \\
      --vector ja=runs/extract-optimistic-ja/vectors.safetensors \\
      [--layer 15] [--data optimistic=FILE] [--full] --out runs/multilingual-optimistic.json

`--layer` (repeatable) screens every vector at those layers; by default each vector is read at the
layer its file records, and the cosine is given at each of those layers. A vector file that records no
trait (`personavec vector` writes none) needs `--trait NAME`.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE.parent) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(HERE.parent))

from personavec.calibration import data_file  # noqa: E402
from personavec.chat import read_chats  # noqa: E402
from personavec.errors import PersonavecError  # noqa: E402
from personavec.pipeline.screen import SCORES, ScreenConfig, read_labels, screen_records  # noqa: E402
from personavec.vecmath import auroc, cosine, separation  # noqa: E402
from personavec.vectors import PersonaVector  # noqa: E402

LANGUAGE_FIELD, LABEL_FIELD = "language", "label"


def default_data(trait: str) -> Path:
    return data_file(f"multilingual/{trait}.jsonl")


def parse_vectors(specs: list[str]) -> dict[str, Path]:
    """`LABEL=PATH` or `PATH` (label: the file's parent folder and stem) -> {label: path}, labels unique."""
    out: dict[str, Path] = {}
    for spec in specs:
        label, sep, path = spec.partition("=")
        if not sep:
            label, path = f"{Path(spec).parent.name}/{Path(spec).stem}", spec
        if not label or not path:
            raise PersonavecError(f"--vector {spec!r}: use LABEL=PATH or PATH")
        if label in out:
            raise PersonavecError(f"--vector {spec!r}: label {label!r} is given twice")
        out[label] = Path(path)
    return out


def parse_data(specs: list[str]) -> dict[str, Path]:
    out = {}
    for spec in specs:
        trait, sep, path = spec.partition("=")
        if not sep or not trait or not path:
            raise PersonavecError(f"--data {spec!r}: use TRAIT=FILE")
        out[trait] = Path(path)
    return out


def group_summary(labels: list[int], personas: list[dict], scores: tuple[str, ...]) -> dict:
    """AUROC of each score, and the label-1 minus label-0 gap of the response projection (raw and as Cohen's d)."""
    import torch

    out: dict = {"n": len(labels), "n_pos": sum(labels), "n_neg": len(labels) - sum(labels), "auroc": {}}
    for s in scores:
        pairs = [(y, p[s]) for y, p in zip(labels, personas) if p.get(s) is not None and not math.isnan(p[s])]
        out["auroc"][s] = auroc([y for y, _ in pairs], [v for _, v in pairs]) if pairs else None
    pos = torch.tensor([p["response_projection"] for y, p in zip(labels, personas)
                        if y and p.get("response_projection") is not None])
    neg = torch.tensor([p["response_projection"] for y, p in zip(labels, personas)
                        if not y and p.get("response_projection") is not None])
    if len(pos) and len(neg):
        out["gap"] = float(pos.mean() - neg.mean())
        out["d"] = separation(pos, neg) if len(pos) + len(neg) > 2 else None
    return out


def by_language(records, labels: list[int], personas: list[dict], scores: tuple[str, ...]) -> dict[str, dict]:
    """`group_summary` per value of the records' `language` field, English first, then in order of appearance."""
    missing = next((r for r in records if not isinstance(r.fields.get(LANGUAGE_FIELD), str)), None)
    if missing is not None:
        raise PersonavecError(f"{missing.where}: no {LANGUAGE_FIELD!r} field (a language code such as \"ja\")")
    seen = list(dict.fromkeys(r.fields[LANGUAGE_FIELD] for r in records))
    languages = sorted(seen, key=lambda code: (code != "en", seen.index(code)))
    out = {}
    for code in languages:
        idx = [i for i, r in enumerate(records) if r.fields[LANGUAGE_FIELD] == code]
        out[code] = group_summary([labels[i] for i in idx], [personas[i] for i in idx], scores)
    return out


def cosines(vectors: dict[str, PersonaVector], layers: dict[str, list[int]]) -> list[dict]:
    """Cosine of every pair of same-trait vectors at each layer either is read at (and at every layer, in full)."""
    rows = []
    labels = list(vectors)
    for i, a in enumerate(labels):
        for b in labels[i + 1:]:
            va, vb = vectors[a], vectors[b]
            if va.trait != vb.trait or va.vectors.shape != vb.vectors.shape:
                continue
            every = cosine(va.vectors.float(), vb.vectors.float())
            for layer in sorted(set(layers[a]) | set(layers[b])):
                rows.append({"trait": va.trait, "a": a, "b": b, "layer": layer, "cosine": float(every[layer]),
                             "cosine_by_layer": [None if math.isnan(x) else round(float(x), 6) for x in every]})
    return rows


def markdown(results: list[dict], cos: list[dict], scores: tuple[str, ...]) -> str:
    languages = list(dict.fromkeys(code for r in results for code in r["by_language"]))
    lines = []
    for score in scores:
        lines += [f"AUROC of `{score}` against `{LABEL_FIELD}`, per language:", "",
                  "| trait | vector | layer | " + " | ".join(languages) + " |",
                  "|---|---|---|" + "---|" * len(languages)]
        for r in results:
            cells = []
            for code in languages:
                value = r["by_language"].get(code, {}).get("auroc", {}).get(score)
                cells.append("-" if value is None else f"{value:.3f}")
            lines.append(f"| {r['trait']} | {r['vector']} | {r['layer']} | " + " | ".join(cells) + " |")
        lines.append("")
    if cos:
        lines += ["| trait | vectors | layer | cosine |", "|---|---|---|---|"]
        lines += [f"| {c['trait']} | {c['a']} vs {c['b']} | {c['layer']} | {c['cosine']:.3f} |" for c in cos]
    return "\n".join(lines)


def load_vectors(vector_paths: dict[str, Path], trait: str | None = None) -> dict[str, PersonaVector]:
    """The vector files; one that records no trait (`personavec vector` writes none) takes `trait`."""
    vectors = {label: PersonaVector.load(path) for label, path in vector_paths.items()}
    for label, v in vectors.items():
        if not v.trait:
            if not trait:
                raise PersonavecError(f"{vector_paths[label]}: records no trait; pass --trait NAME")
            v.trait = trait
    return vectors


def run(model, tokenizer, vector_paths: dict[str, Path], data: dict[str, Path], layers: list[int] | None,
        full: bool = False, max_new_tokens: int = 128, batch_size: int = 16, show_progress: bool = True,
        trait: str | None = None) -> dict:
    """Screen each vector's trait data per language (and compute the cosines); the JSON result."""
    vectors = load_vectors(vector_paths, trait)
    for v in vectors.values():
        v.check_model(model)
    used: dict[str, list[int]] = {label: [v.check_layer(L) for L in (layers or [None])] for label, v in vectors.items()}
    # the response-mean projection first: it is the reading the question is about; ΔP only with --full
    order = ("response_projection", "approx_projection_difference", "projection_difference")
    scores = tuple(s for s in order if s in SCORES and (full or s != "projection_difference"))
    records_by_trait = {}
    results = []
    for label, v in vectors.items():
        path = data.get(v.trait) or default_data(v.trait)
        if not path.is_file():
            raise PersonavecError(f"{vector_paths[label]}: no labelled multilingual data for trait {v.trait!r} "
                                  f"({path} not found); pass --data {v.trait}=FILE")
        if v.trait not in records_by_trait:
            records_by_trait[v.trait] = read_chats(path, require_response=True)
        records = records_by_trait[v.trait]
        labels = read_labels(records, LABEL_FIELD)
        for layer in used[label]:
            cfg = ScreenConfig(layer=layer, approx=not full, max_new_tokens=max_new_tokens, batch_size=batch_size)
            personas, _ = screen_records(model, tokenizer, records, v, cfg, show_progress=show_progress)
            results.append({"vector": label, "path": str(vector_paths[label]), "trait": v.trait, "layer": layer,
                            "recorded_layer": v.layer, "data": str(path),
                            "by_language": by_language(records, labels, personas, scores),
                            "all": group_summary(labels, personas, scores)})
    cos = cosines(vectors, used)
    return {"results": results, "cosines": cos, "scores": list(scores), "markdown": markdown(results, cos, scores)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="packaged name, hub id or folder (the vectors' model)")
    parser.add_argument("--vector", action="append", required=True, metavar="[LABEL=]PATH",
                        help="a vector file; repeat for more (e.g. en=... ja=...)")
    parser.add_argument("--data", action="append", default=[], metavar="TRAIT=FILE",
                        help="labelled chats with 'language' and 'label' fields "
                             "(default: personavec/data/multilingual/TRAIT.jsonl)")
    parser.add_argument("--trait", default=None, help="the trait of vector files that record none")
    parser.add_argument("--layer", action="append", type=int, default=None,
                        help="layer(s) to read every vector at (default: each file's recorded layer)")
    parser.add_argument("--full", action="store_true", help="also the paper's ΔP against the model's own greedy answers")
    parser.add_argument("--max-new-tokens", type=int, default=128, help="--full: length of the base answers")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--out", required=True, help="JSON result file")
    args = parser.parse_args(argv)
    try:
        if args.batch_size < 1 or args.max_new_tokens < 1:
            raise PersonavecError("--batch-size and --max-new-tokens must be at least 1")
        if any(L < 0 for L in args.layer or []):
            raise PersonavecError("--layer must be 0 or more")
        from personavec.models import load_model

        if Path(args.out).is_dir():
            raise PersonavecError(f"--out {args.out}: is a folder; give a JSON file name")
        vector_paths, data = parse_vectors(args.vector), parse_data(args.data)
        for path in [*vector_paths.values(), *data.values()]:
            if not path.is_file():
                raise PersonavecError(f"{path}: no such file")
        for v in load_vectors(vector_paths, args.trait).values():  # bad files and layers fail before the model loads
            for layer in args.layer or [None]:
                v.check_layer(layer)
            path = data.get(v.trait) or default_data(v.trait)
            if not path.is_file():
                raise PersonavecError(f"no labelled multilingual data for trait {v.trait!r} ({path} not found); "
                                      f"pass --data {v.trait}=FILE")
        model, tokenizer = load_model(args.model, dtype=args.dtype)
        result = run(model, tokenizer, vector_paths, data, args.layer, args.full, args.max_new_tokens,
                     args.batch_size, trait=args.trait)
    except PersonavecError as exc:
        print(f"error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    result = {"model": args.model, **result}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    print(result["markdown"])
    print(f"wrote {args.out}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
