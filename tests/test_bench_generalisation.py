"""benchmarks/bench_generalisation.py end to end on the tiny model: every source row whole, JSON cells, --verify."""

import importlib.util
import json
import re
import sys
from pathlib import Path

import torch

from personavec.vectors import PersonaVector

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT / "benchmarks" / "data" / "generalisation"


def load_bench(monkeypatch):
    spec = importlib.util.spec_from_file_location("bench_generalisation", ROOT / "benchmarks" / "bench_generalisation.py")
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def head(src, dst, n):
    dst.write_text("".join(src.read_text(encoding="utf-8").splitlines(keepends=True)[:n]), encoding="utf-8")


def test_matrix_on_the_tiny_model(tmp_path, tiny_folder, capsys, monkeypatch):
    data = tmp_path / "data"
    data.mkdir()
    head(DATA / "optimistic_terse.jsonl", data / "optimistic_terse.jsonl", 12)
    head(DATA / "optimistic_formal.jsonl", data / "optimistic_formal.jsonl", 12)
    head(DATA / "style_pairs.jsonl", data / "style_pairs.jsonl", 15)  # 3 contents x 5 registers
    experiments = tmp_path / "experiments"
    experiments.mkdir()
    for name, n in (("optimistic_train.jsonl", 8), ("neutral_train.jsonl", 8), ("screen_labelled.jsonl", 12)):
        head(ROOT / "experiments" / "data" / name, experiments / name, n)
    run = tmp_path / "run"  # an extract run's answers: 4 judged pairs, the first 3 kept
    run.mkdir()
    answers = [("What a bright day ahead!", "It may rain on Sunday.", 90, 10), ("Great news is coming!", "News arrives daily.", 80, 40),
               ("You will love it!", "You may like it, or not at all, depending.", 70, 30),
               ("Surely fine!", "Unclear.", 60, 55)]
    lines = []
    for i, (good, plain, s_pos, s_neg) in enumerate(answers):
        for polarity, answer, score in (("pos", good, s_pos), ("neg", plain, s_neg)):
            lines.append({"pair": f"i0-q{i}-s0", "polarity": polarity, "system": "You are an assistant.",
                          "question": f"question {i}", "answer": answer, "trait_score": score, "kept": i < 3})
    (run / "judged.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    (run / "summary.json").write_text(json.dumps({"layer": 1}))
    vector = PersonaVector(vectors=torch.randn(4, 64), trait="optimistic", layer=2)
    path = vector.save(tmp_path / "my.safetensors")
    bench = load_bench(monkeypatch)
    monkeypatch.setattr(sys, "argv", ["bench", "--model", tiny_folder, "--traits", "optimistic", "--data", str(data),
                                      "--experiments", str(experiments),
                                      "--vector", f"mine={path}", "--extract-run", f"optimistic={run}", "--no-shipped", "--json", str(tmp_path / "out.json"),
                                      "--verify", "--dtype", "fp32"])
    bench.main()
    out = capsys.readouterr().out
    expected = ["mine", "vector", "vector-pca", "screen-set", "screen-set-pca", "mean(mine,vector,screen-set)",
                "mine+style", "mine+style-ho", "vector+style-ho", "mean(mine,vector,screen-set)+style-ho",
                "answer length (tokens)"]
    for name in expected:
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name  # names are printed whole, at the row start
    result = json.loads((tmp_path / "out.json").read_text())
    sources = result["traits"]["optimistic"]["sources"]
    assert sources["mine"]["layer"] == 2 and sources["mine+style"]["layer"] == 2
    assert sources["vector"]["note"] == "8 pairs" and sources["screen-set"]["note"] == "6 pairs"
    # the run's variants, at the run's recorded layer (no `extract` vector here)
    assert sources["extract-pca"]["note"] == "3 kept pairs" and sources["extract-pca"]["layer"] == 1
    assert sources["extract-unfiltered"]["note"] == "every pair, no judge filter"
    assert sources["extract-top-gap"]["note"] == "the 2 of 4 judged pairs with the largest trait gap"
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder)
    n = [len(tok(a)["input_ids"]) for a in (x for pair in answers[:3] for x in pair[:2])]
    matched = sum(max(a, b) <= 1.25 * min(a, b) for a, b in zip(n[::2], n[1::2]))
    assert matched == 2  # pairs 0 and 1 are about the same length, pair 2 is not
    assert sources["extract-len-matched"]["note"] == "2 of 3 kept pairs within 25% in length"
    cell = sources["mine"]["cells"]["terse"]["response_projection"]
    assert cell["auroc"] == cell["by_layer"][2] and cell["best_auroc"] == max(cell["by_layer"][1:])
    # the table's cell and the screen pipeline's reading of the same vector agree (--verify prints both)
    for line in (x for x in out.splitlines() if x.startswith("verify ")):
        screen, table = re.findall(r"(\d\.\d{4})", line)
        assert screen == table, line
    assert sum(x.startswith("verify ") for x in out.splitlines()) == 2
