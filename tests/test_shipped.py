"""Vectors shipped with the package: lookup, `--trait NAME` on the commands, the fingerprint refusal, and the
files themselves (personavec/data/vectors/<model>/<trait>.safetensors)."""

import json

import pytest
import torch
from test_cli import assert_user_error, run_cli, write_jsonl

from personavec import shipped
from personavec.pipeline.contrast import builtin_contrast, contrastive_vector
from personavec.traits import list_traits
from personavec.vectors import PersonaVector

pytestmark = pytest.mark.model

MODEL = "smollm2-135m"


@pytest.fixture(scope="module")
def smollm():
    from personavec.models import load_model

    return load_model(MODEL)


@pytest.fixture(scope="module")
def made_here(smollm):
    model, tok = smollm
    pos, neg = builtin_contrast()
    vector, _ = contrastive_vector(model, tok, pos[:6], neg[:6], trait="optimistic", show_progress=False)
    vector.model = MODEL
    return vector


@pytest.fixture
def fake_root(tmp_path, monkeypatch, made_here):
    """A shipped-vectors folder holding one optimistic vector made on smollm2-135m here."""
    vector = made_here
    root = tmp_path / "vectors"
    (root / MODEL).mkdir(parents=True)
    vector.save(root / MODEL / "optimistic.safetensors")
    (root / MODEL / "optimistic.json").write_text(json.dumps({"layer": vector.layer, "counts": {}}))
    monkeypatch.setattr(shipped, "shipped_root", lambda: root)
    return root


def test_trait_flag_uses_the_shipped_file(fake_root, tmp_path, capsys):
    chats = [[{"role": "user", "content": q}] for q in ("Will tomorrow be good?", "How is the market?")]
    data = write_jsonl(tmp_path / "in.jsonl", chats)
    code, _, err = run_cli(capsys, "monitor", "--model", MODEL, "--trait", "optimistic", "--input", data,
                           "--output", tmp_path / "a.jsonl")
    assert code == 0, err
    code, _, err = run_cli(capsys, "monitor", "--model", MODEL, "--vector", fake_root / MODEL / "optimistic.safetensors",
                           "--input", data, "--output", tmp_path / "b.jsonl")
    assert code == 0, err
    read = lambda p: [json.loads(line)["persona"] for line in p.read_text().splitlines()]  # noqa: E731
    a, b = read(tmp_path / "a.jsonl"), read(tmp_path / "b.jsonl")
    assert [x["projection"] for x in a] == [x["projection"] for x in b]
    config = json.loads((tmp_path / "a_run" / "config.json").read_text())
    assert config["vector"] == str(fake_root / MODEL / "optimistic.safetensors")


def test_a_shipped_vector_for_other_weights_is_refused(fake_root, tmp_path, capsys):
    path = fake_root / MODEL / "optimistic.safetensors"
    vector = PersonaVector.load(path)
    vector.fingerprint = "0123456789abcdef"
    vector.save(path)
    data = write_jsonl(tmp_path / "in.jsonl", [[{"role": "user", "content": "Hi"}]])
    for command in (["monitor", "--input", data, "--output", tmp_path / "o.jsonl"],
                    ["steer", "--coef", "1", "--prompt", "Hi"]):
        out = run_cli(capsys, command[0], "--model", MODEL, "--trait", "optimistic", *command[1:])
        assert_user_error(*out, "--trait optimistic", "0123456789abcdef", "fingerprint")
    assert not (tmp_path / "o.jsonl").exists()
    # the same file passed as --vector only warns: it may be meant for a fine-tune of the model
    code, _, err = run_cli(capsys, "monitor", "--model", MODEL, "--vector", path, "--input", data,
                           "--output", tmp_path / "o.jsonl")
    assert code == 0 and "fingerprint differs" in err


def test_no_shipped_vector_lists_what_ships(fake_root, tmp_path, capsys):
    data = write_jsonl(tmp_path / "in.jsonl", [[{"role": "user", "content": "Hi"}]])
    out = run_cli(capsys, "screen", "--model", MODEL, "--trait", "evil", "--data", data,
                  "--output", tmp_path / "o.jsonl")
    assert_user_error(*out, "--trait evil", f"{MODEL}: optimistic")
    out = run_cli(capsys, "monitor", "--model", MODEL, "--input", data, "--output", tmp_path / "o.jsonl")
    assert_user_error(*out, "--vector FILE", "--trait NAME")
    out = run_cli(capsys, "profile", "--model", "qwen2.5-coder-1.5b", "--out", tmp_path / "p")
    assert_user_error(*out, "--model qwen2.5-coder-1.5b", MODEL)


def test_vectors_list_prints_names_in_full_when_piped(fake_root, capsys):
    code, out, err = run_cli(capsys, "vectors", "list")
    assert code == 0, err
    line = next(line for line in out.splitlines() if "optimistic" in line)
    assert MODEL in line and str(fake_root / MODEL / "optimistic.safetensors") in out.replace("\n", "")


# -- the files that ship --------------------------------------------------------------------------------------

SHIPPED = shipped.shipped_vectors()


@pytest.mark.skipif(not SHIPPED, reason="no vectors built yet (make vectors)")
@pytest.mark.parametrize("v", SHIPPED, ids=lambda v: f"{v.model}/{v.trait}")
def test_shipped_files_are_complete(v):
    from safetensors import safe_open

    assert v.trait in list_traits()
    with safe_open(str(v.path), framework="pt") as f:
        meta = f.metadata()
    for key in ("pos_mean", "pos_sd", "neg_mean", "neg_sd"):
        float(meta[key])  # the contract: numbers as strings
    vector = PersonaVector.load(v.path)
    assert vector.model == v.model and vector.trait == v.trait and vector.layer is not None
    assert float(meta["pos_mean"]) > float(meta["neg_mean"])  # the kept trait answers project higher
    assert vector.scaled(float(meta["pos_mean"])) == pytest.approx(1.0)
    assert vector.scaled(float(meta["neg_mean"])) == pytest.approx(0.0)
    summary = v.summary()
    assert summary["settings"] == shipped.BUILD_SETTINGS and summary["layer"] == vector.layer
    assert summary["counts"]["pairs_kept"] == vector.n_pos


@pytest.mark.skipif(not any(v.model == MODEL for v in SHIPPED), reason="no smollm2-135m vectors built yet")
def test_shipped_smollm2_vectors_match_the_packaged_weights(smollm):
    from personavec.backends import as_backend

    fingerprint = as_backend(*smollm).fingerprint()
    assert shipped.packaged_fingerprint(MODEL) == fingerprint  # the check reads files, the model agrees
    for v in SHIPPED:
        if v.model == MODEL:
            assert PersonaVector.load(v.path).fingerprint == fingerprint
            assert torch.isfinite(PersonaVector.load(v.path).vectors).all()


def test_vectors_build_refuses_bad_flags_before_loading_anything(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(shipped, "build_shipped_vectors", lambda *a, **k: pytest.fail("the build started"))
    (tmp_path / "file").write_text("x")
    for args, needle in ((["--models", "foo"], "--models 'foo'"), (["--traits", "nosuch"], "--traits"),
                         (["--work", tmp_path / "file"], "--work"), (["--dest", tmp_path / "file"], "--dest")):
        assert_user_error(*run_cli(capsys, "vectors", "build", *args), needle)


def test_vectors_build_keeps_current_vectors_and_remakes_stale_ones(fake_root, tmp_path, monkeypatch):
    """A lost run folder does not cost a rebuild: a vector with today's settings, judge and weights is kept."""
    import personavec.backends as backends
    import personavec.judge as judge

    class Built(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Built()

    monkeypatch.setattr(judge, "make_judge", refuse)
    monkeypatch.setattr(backends, "load_backend", refuse)
    record = {"layer": 3, "judge": shipped.BUILD_JUDGE, "settings": dict(shipped.BUILD_SETTINGS)}
    (fake_root / MODEL / "optimistic.json").write_text(json.dumps(record))
    lines = []
    built = shipped.build_shipped_vectors([MODEL], ["optimistic"], tmp_path / "work", fake_root, log=lines.append)
    assert built == [] and "up to date" in lines[0] and "--rebuild" in lines[0]
    with pytest.raises(Built):  # --rebuild makes it again
        shipped.build_shipped_vectors([MODEL], ["optimistic"], tmp_path / "work", fake_root, rebuild=True)
    for stale in ({**record, "settings": {**record["settings"], "questions": 20}}, {**record, "judge": "openai:x"}):
        (fake_root / MODEL / "optimistic.json").write_text(json.dumps(stale))
        with pytest.raises(Built):
            shipped.build_shipped_vectors([MODEL], ["optimistic"], tmp_path / "work", fake_root, log=lines.append)
    (fake_root / MODEL / "optimistic.json").write_text(json.dumps(record))
    with pytest.raises(Built):  # another model's weights
        vector = PersonaVector.load(fake_root / MODEL / "optimistic.safetensors")
        vector.fingerprint = "0123456789abcdef"
        vector.save(fake_root / MODEL / "optimistic.safetensors")
        shipped.build_shipped_vectors([MODEL], ["optimistic"], tmp_path / "work", fake_root, log=lines.append)
    with pytest.raises(Built):  # a missing trait is made
        shipped.build_shipped_vectors([MODEL], ["evil"], tmp_path / "work", fake_root, log=lines.append)
