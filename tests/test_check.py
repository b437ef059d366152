"""`extract --check FILE`: AUROC of the new vector's readings on labelled files, validated before any generation."""

import json

import pytest
import torch
from test_cli import assert_user_error, run_cli
from test_pipeline import ConstantJudge, cfg_for

from personavec.chat import read_chats
from personavec.errors import PersonavecError
from personavec.models import load_model
from personavec.backends.base import Activations
from personavec.pipeline.check import read_check_files, split_half_ceiling
from personavec.pipeline.extract import run_extract
from personavec.pipeline.screen import ScreenConfig, screen_records
from personavec.traits import load_trait
from personavec.vecmath import auroc

ANSWERS = [("What a lovely day it will be!", 1), ("It may rain later.", 0), ("Everything will turn out great!", 1),
           ("The shop closes at six.", 0), ("You will love it, I am sure!", 1), ("Bring an umbrella.", 0)]


@pytest.fixture
def tiny_lm(tiny_folder):
    return load_model(tiny_folder, dtype="fp32")


def labelled(path, rows):
    lines = [{"messages": [{"role": "user", "content": f"question {i}"}, {"role": "assistant", "content": a}],
              "label": y} for i, (a, y) in enumerate(rows)]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return path


def test_checks_match_screen_at_every_layer_and_reach_summary_and_report(tiny_folder, tiny_lm, tmp_path):
    model, tok = tiny_lm
    a = labelled(tmp_path / "a.jsonl", ANSWERS)
    b = labelled(tmp_path / "b.jsonl", list(reversed(ANSWERS[:4])))
    judge = ConstantJudge(cache=tmp_path / "cache.sqlite")
    result = run_extract(cfg_for(tiny_folder, judge="test", neg_threshold=90), load_trait("optimistic"), model, tok,
                         judge, tmp_path / "r", checks=[str(a), str(b), str(a)])
    checks = result.summary["checks"]
    assert list(checks) == [str(a), str(b)]  # a file given twice is one check
    layer = result.summary["layer"]
    for name, path in ((str(a), a), (str(b), b)):
        records = read_chats(path)
        labels = [r.fields["label"] for r in records]
        entry = checks[name]
        assert (entry["n"], entry["n_label_1"], entry["n_label_0"], entry["layer"]) == \
            (len(records), sum(labels), len(labels) - sum(labels), layer)
        # independently: the screen pipeline's own readings with this vector at each layer
        for each in range(0, 4):
            personas, _ = screen_records(model, tok, records, result.vector, ScreenConfig(layer=each, approx=True),
                                         show_progress=False)
            for reading in ("response_projection", "approx_projection_difference"):
                expected = auroc(labels, [p[reading] for p in personas])
                assert entry["by_layer"][reading][each] == pytest.approx(expected, abs=1e-9), (name, each, reading)
        for reading in ("response_projection", "approx_projection_difference"):
            values = entry["by_layer"][reading]
            assert entry[reading]["auroc"] == values[layer]
            assert entry[reading]["best_auroc"] == max(values[1:])
            assert values[entry[reading]["best_layer"]] == entry[reading]["best_auroc"]
    on_disk = json.loads((tmp_path / "r" / "summary.json").read_text())
    assert on_disk["checks"] == json.loads(json.dumps(checks))
    report = (tmp_path / "r" / "report.html").read_text()
    assert "Checks: AUROC on labelled files" in report and str(b) in report
    # checks are not part of the config: another check file resumes the run instead of refusing it
    again = run_extract(cfg_for(tiny_folder, judge="test", neg_threshold=90), load_trait("optimistic"), model, tok,
                        judge, tmp_path / "r", checks=[str(b)])
    assert list(again.summary["checks"]) == [str(b)]
    assert again.summary["checks"][str(b)] == checks[str(b)]


@pytest.mark.parametrize("content, needle", [
    (None, "--check {path}: no such file"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": 1}\n'
     '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "label": "yes"}\n',
     "{path}:2: 'label' is 'yes'; it must be 0 or 1"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}\n',
     "{path}:1: no 'label' field"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": 1}\n'
     '{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "b"}], "label": 1}\n',
     "--check {path}: every chat has label 1; an AUROC needs both classes"),
    ('{"messages": [{"role": "user", "content": "q"}], "label": 0}\n', "{path}:1: the chat has no non-empty final"),
    ('{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": 1}\n{oops\n',
     "{path}:2: invalid JSON"),
])
def test_bad_check_files_are_refused_before_any_model_loads(capsys, tmp_path, monkeypatch, content, needle):
    import personavec.pipeline.extract as extract

    monkeypatch.setattr(extract, "generate_missing", lambda *a, **k: pytest.fail("generated before checking --check"))
    good = labelled(tmp_path / "good.jsonl", ANSWERS)
    path = tmp_path / "check.jsonl"
    if content is not None:
        path.write_text(content, encoding="utf-8")
    # the model does not exist: an error about it would mean the check file was read too late
    result = run_cli(capsys, "extract", "--model", "no-such-model", "--trait", "optimistic", "--judge", "none",
                     "--out", tmp_path / "x", "--check", good, "--check", path)
    assert_user_error(*result, needle.format(path=path))
    assert not (tmp_path / "x").exists()


def test_read_check_files_refuses_a_folder(tmp_path):
    with pytest.raises(PersonavecError, match=f"--check {tmp_path}: is a folder"):
        read_check_files([tmp_path])


def test_extract_check_on_the_command_line(capsys, tmp_path, tiny_folder, monkeypatch):
    import personavec.judge as judge_mod

    monkeypatch.setattr(judge_mod, "make_judge", lambda spec, *a, **k: ConstantJudge(cache=tmp_path / "j.sqlite"))
    path = labelled(tmp_path / "c.jsonl", ANSWERS)
    code, out, err = run_cli(capsys, "extract", "--model", tiny_folder, "--trait", "optimistic", "--judge",
                             "openai:fake", "--questions", "1", "--max-new-tokens", "2", "--layers", "1,2",
                             "--sweep-questions", "1", "--neg-threshold", "90", "--out", tmp_path / "r",
                             "--check", path)
    assert code == 0, err
    summary = json.loads((tmp_path / "r" / "summary.json").read_text())
    entry = summary["checks"][str(path)]
    line = next(x for x in err.splitlines() if x.startswith(f"check {path}: "))
    assert f"AUROC at layer {summary['layer']}: response projection {entry['response_projection']['auroc']:.3f}" in line
    assert "check" not in json.loads((tmp_path / "r" / "config.json").read_text())


def test_split_half_ceiling_against_a_hand_computation():
    # one layer, hidden 2; groups a,b,c,d (sorted: a, c train fold 1; b, d fold 2); label 1 rows first in each pair
    x = torch.tensor([[3.0, 1.0], [1.0, 1.0],    # a: diff (2, 0)
                      [0.0, 2.0], [0.0, 0.0],    # b: diff (0, 2)
                      [5.0, 0.0], [4.0, 0.0],    # c: diff (1, 0)
                      [1.0, 0.0], [0.0, 3.0],    # d
                      [9.0, 9.0], [9.0, 9.0]])   # e: skipped, must not count
    labels = [1, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    groups = ["a", "a", "b", "b", "c", "c", "d", "d", "e", "e"]
    acts = Activations(layers=[0], response_avg=x[:, None, :], skipped=[8, 9])
    # by hand: the sorted kept groups a, b, c, d; first fold {a, c}. Fold 1 direction = mean(pos a,c) - mean(neg a,c)
    # = (4, .5) - (2.5, .5) = (1.5, 0) -> x-axis; test b, d: pos x 0, 1 vs neg x 0, 0 -> pairs (0>0 tie .5, 0>0 .5,
    # 1>0 1, 1>0 1) = 3/4. Fold 2 direction = mean(pos b,d) - mean(neg b,d) = (.5, 1) - (0, 1.5) = (.5, -.5);
    # test a, c on (1, -1)/sqrt2 (times sqrt2): pos 2, 5; neg 0, 4 -> 2>0, 2<4, 5>0, 5>4 = 3/4. Mean 0.75.
    assert split_half_ceiling(acts, labels, groups) == [pytest.approx(0.75)]
