"""The `personavec` command on a tiny random model saved as a local folder.

Commands run through `personavec.cli.main()` (the real entry point: it turns a
PersonavecError into one `error: ...` line on stderr and exit code 2). Most run
in-process for speed; one error case runs as a real subprocess to prove the
process-level exit code and stderr.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import CHATS

from personavec import cli
from personavec.vectors import PersonaVector

N_LAYERS, HIDDEN = 3, 64  # the tiny_folder model


def run_cli(capsys, *args):
    """Run `personavec ARGS` through main(); return (exit code, stdout, stderr)."""
    capsys.readouterr()
    old = sys.argv
    sys.argv = ["personavec", *map(str, args)]
    try:
        cli.main()
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    finally:
        sys.argv = old
    out, err = capsys.readouterr()
    return code, out, err


def run_process(tmp_path, *args):
    env = {**os.environ, "PERSONAVEC_CACHE": str(tmp_path / "cache"), "COLUMNS": "200"}
    proc = subprocess.run([sys.executable, "-m", "personavec.cli", *map(str, args)], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=120)
    return proc.returncode, proc.stdout, proc.stderr


def assert_user_error(code, out, err, *needles):
    assert code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("error: "), err
    for needle in needles:
        assert str(needle) in last, (needle, last)
    assert "Traceback" not in err and out == ""


def write_jsonl(path, chats, extra=None):
    path.write_text("".join(json.dumps({**(extra or {}), "messages": c}) + "\n" for c in chats), encoding="utf-8")
    return path


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def contrast(tmp_path):
    pos = write_jsonl(tmp_path / "pos.jsonl", CHATS[:2])
    neg = write_jsonl(tmp_path / "neg.jsonl", [CHATS[2], CHATS[0][:1] + [{"role": "assistant", "content": "no way"}]])
    return pos, neg


@pytest.fixture
def big_vector(tmp_path):
    """A vector file for the tiny model, strong enough that steering at coef 1 changes greedy answers."""
    torch.manual_seed(1)
    return PersonaVector(vectors=torch.randn(N_LAYERS + 1, HIDDEN) * 30, trait="loud").save(tmp_path / "v.safetensors")


# -- vector --------------------------------------------------------------------

def test_vector_command_writes_the_mean_difference(capsys, tmp_path, tiny_folder, contrast):
    from personavec.models import load_model
    from personavec.pipeline.contrast import contrastive_vector

    pos, neg = contrast
    out = tmp_path / "v.safetensors"
    code, stdout, err = run_cli(capsys, "vector", "--model", tiny_folder, "--pos", pos, "--neg", neg, "--out", out,
                                "--trait", "kind")
    assert code == 0, err
    assert stdout == "" and f"wrote {out}" in err
    vec = PersonaVector.load(out)
    assert vec.vectors.shape == (N_LAYERS + 1, HIDDEN)
    assert (vec.trait, vec.model, vec.n_pos, vec.n_neg, vec.position) == ("kind", tiny_folder, 2, 2, "response_avg")
    assert 1 <= vec.layer <= N_LAYERS and vec.prompt_last is not None
    lm, tok = load_model(tiny_folder)
    expected, _ = contrastive_vector(lm, tok, CHATS[:2], [CHATS[2], CHATS[0][:1] + [{"role": "assistant", "content": "no way"}]],
                                     show_progress=False)
    torch.testing.assert_close(vec.vectors, expected.vectors)
    assert vec.vectors.abs().sum() > 0


def test_vector_prompt_last_needs_no_answers(capsys, tmp_path, tiny_folder):
    pos = write_jsonl(tmp_path / "pos.jsonl", [c[:-1] for c in CHATS[:2]])
    neg = write_jsonl(tmp_path / "neg.jsonl", [CHATS[2][:-1]])
    out = tmp_path / "v.safetensors"
    code, _, err = run_cli(capsys, "vector", "--model", tiny_folder, "--pos", pos, "--neg", neg, "--out", out,
                           "--position", "prompt_last")
    assert code == 0, err
    vec = PersonaVector.load(out)
    assert vec.position == "prompt_last" and vec.vectors.shape == (N_LAYERS + 1, HIDDEN)
    torch.testing.assert_close(vec.vectors, vec.prompt_last)


# -- steer ---------------------------------------------------------------------

def library_answers(folder, vector_path, chats, layer=2, coef=1.0):
    from personavec.generate import generate
    from personavec.models import load_model

    lm, tok = load_model(folder)
    plain = generate(lm, tok, chats, max_new_tokens=5, show_progress=False)
    with PersonaVector.load(vector_path).apply(lm, layer=layer, coef=coef):
        steered = generate(lm, tok, chats, max_new_tokens=5, show_progress=False)
    return steered, plain


def test_steer_prompt_prints_only_the_answer(capsys, tiny_folder, big_vector):
    code, out, err = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", big_vector, "--layer", 2,
                             "--coef", 1, "--prompt", "hi", "--max-new-tokens", 5)
    assert code == 0, err
    steered, plain = library_answers(tiny_folder, big_vector, [[{"role": "user", "content": "hi"}]])
    assert steered != plain  # the vector does something, so matching `steered` proves it was applied
    assert out == steered[0] + "\n"
    assert "steering loud at layer 2, coef 1.0" in err and "steering" not in out


def test_steer_input_output(capsys, tmp_path, tiny_folder, big_vector):
    chats = [CHATS[0], CHATS[1][:-1]]
    src = write_jsonl(tmp_path / "in.jsonl", chats, extra={"id": "x"})
    dst = tmp_path / "out.jsonl"
    code, out, err = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", big_vector, "--layer", 2,
                             "--coef", 1, "--input", src, "--output", dst, "--max-new-tokens", 5)
    assert code == 0, err
    assert out == ""
    rows = [json.loads(line) for line in dst.read_text(encoding="utf-8").splitlines()]
    steered, _ = library_answers(tiny_folder, big_vector, [CHATS[0][:-1], CHATS[1][:-1]])
    assert len(rows) == 2
    for row, chat, answer in zip(rows, chats, steered):
        prompt = chat[:-1] if chat[-1]["role"] == "assistant" else chat
        assert row["messages"] == prompt + [{"role": "assistant", "content": answer}]
        assert row["id"] == "x"
        assert row["steering"] == {"trait": "loud", "layer": 2, "coef": 1.0, "coef_mode": "raw"}


def test_steer_monitor_and_screen_declare_only_their_one_op_to_the_engine(capsys, monkeypatch, tmp_path,
                                                                           tiny_folder, big_vector):
    """vLLM's compiled graph runs an op per declared layer every step, so `steer` declares a steer op at the one
    layer it steers and `monitor` / `screen` a capture op at theirs; the transformers engine gets no options."""
    import personavec.backends as backends

    real, seen = backends.load_backend, []

    def recording(spec, engine="hf", *args, **kwargs):
        seen.append((engine, kwargs))
        return real(spec, "hf", *args)  # the run itself on transformers: vLLM is not installed here

    monkeypatch.setattr(backends, "load_backend", recording)
    for engine, layer in (("vllm", 2), ("vllm", 1), ("hf", 2)):
        code, out, err = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", big_vector, "--layer", layer,
                                 "--coef", 1, "--prompt", "hi", "--max-new-tokens", 3, "--engine", engine)
        assert code == 0, err
        declared = {"steer_layers": [layer], "read_layers": [], "capture_layers": []} if engine == "vllm" else {}
        assert seen[-1] == (engine, declared)
    data = write_jsonl(tmp_path / "in.jsonl", CHATS[:2])
    for command, io in (("monitor", ["--input", data]), ("screen", ["--data", data, "--approx"])):
        code, _, err = run_cli(capsys, command, "--model", tiny_folder, "--vector", big_vector, "--layer", 1, *io,
                               "--output", tmp_path / f"{command}.jsonl", "--engine", "vllm")
        assert code == 0, err
        assert seen[-1] == ("vllm", {"steer_layers": [], "read_layers": [], "capture_layers": [1]}), command


# -- export --------------------------------------------------------------------

def test_export_gguf_and_pt(capsys, tmp_path, big_vector):
    import gguf

    gguf_out, pt_out = tmp_path / "v.gguf", tmp_path / "v.pt"
    code, _, err = run_cli(capsys, "export", "--vector", big_vector, "--format", "gguf", "--out", gguf_out, "--layer", 3)
    assert code == 0, err
    assert "--control-vector-layer-range 2 2" in err  # our layer 3 is llama.cpp's layer 2
    reader = gguf.GGUFReader(str(gguf_out))
    assert reader.fields["general.architecture"].contents() == "controlvector"
    assert [t.name for t in reader.tensors] == ["direction.2"]
    vec = PersonaVector.load(big_vector)
    torch.testing.assert_close(torch.tensor(reader.tensors[0].data.copy()).reshape(-1), vec.vectors[3], rtol=0, atol=0)
    code, _, err = run_cli(capsys, "export", "--vector", big_vector, "--format", "pt", "--out", pt_out)
    assert code == 0, err
    torch.testing.assert_close(torch.load(pt_out, weights_only=True), vec.vectors, rtol=0, atol=0)


# -- user errors: exit 2, one `error:` line naming the culprit, no output file ------

def test_malformed_jsonl_in_pos(capsys, tmp_path, contrast):
    pos, neg = contrast
    bad = tmp_path / "bad.jsonl"
    bad.write_text(pos.read_text() + "\n{not json\n")
    out = tmp_path / "v.safetensors"
    result = run_cli(capsys, "vector", "--model", "no-such-model", "--pos", bad, "--neg", neg, "--out", out)
    assert_user_error(*result, f"{bad}:4: invalid JSON")
    assert not out.exists()


def test_nan_vector_real_process(tmp_path):
    from safetensors.torch import save_file

    vec = torch.randn(N_LAYERS + 1, HIDDEN)
    vec[2, 5] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file({"vectors": vec}, str(path))
    code, stdout, err = run_process(tmp_path, "steer", "--model", "no-such-model", "--vector", path, "--coef", 1,
                                    "--layer", 2, "--prompt", "hi")
    assert_user_error(code, stdout, err, str(path), "NaN or inf")


def test_pos_chat_without_answer(capsys, tmp_path, contrast):
    _, neg = contrast
    pos = write_jsonl(tmp_path / "pos.jsonl", [CHATS[0], CHATS[1][:-1]])
    out = tmp_path / "v.safetensors"
    result = run_cli(capsys, "vector", "--model", "no-such-model", "--pos", pos, "--neg", neg, "--out", out)
    assert_user_error(*result, f"{pos}:2:", "no final assistant message")
    assert not out.exists()


def test_unknown_model(capsys, tmp_path, contrast):
    pos, neg = contrast
    out = tmp_path / "v.safetensors"
    result = run_cli(capsys, "vector", "--model", "no-such-model", "--pos", pos, "--neg", neg, "--out", out)
    assert_user_error(*result, "unknown model 'no-such-model'", "smollm2-135m")
    assert not out.exists()


def steer_to_file(capsys, tmp_path, model, vector, *extra):
    src = write_jsonl(tmp_path / "in.jsonl", [CHATS[0]])
    dst = tmp_path / "answers.jsonl"
    result = run_cli(capsys, "steer", "--model", model, "--vector", vector, "--coef", 1, "--input", src,
                     "--output", dst, "--max-new-tokens", 2, *extra)
    return result, dst


def test_vector_of_another_hidden_size(capsys, tmp_path, tiny_folder):
    path = PersonaVector(vectors=torch.randn(N_LAYERS + 1, 32)).save(tmp_path / "small.safetensors")
    result, dst = steer_to_file(capsys, tmp_path, tiny_folder, path, "--layer", 2)
    assert_user_error(*result, str(path), "hidden size 32", "hidden size 64")
    assert not dst.exists()


def test_layer_out_of_range(capsys, tmp_path, tiny_folder, big_vector):
    result, dst = steer_to_file(capsys, tmp_path, tiny_folder, big_vector, "--layer", 99)
    assert_user_error(*result, "--layer 99", str(big_vector))
    assert not dst.exists()


def test_gguf_that_is_not_a_control_vector(capsys, tmp_path, tiny_folder):
    import gguf
    import numpy as np

    path = tmp_path / "x.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    result, dst = steer_to_file(capsys, tmp_path, tiny_folder, path, "--layer", 2)
    assert_user_error(*result, str(path), "control vector")
    assert not dst.exists()


def test_pt_holding_a_dict(capsys, tmp_path, tiny_folder):
    path = tmp_path / "v.pt"
    torch.save({"vectors": torch.randn(N_LAYERS + 1, HIDDEN)}, path)
    result, dst = steer_to_file(capsys, tmp_path, tiny_folder, path, "--layer", 2)
    assert_user_error(*result, str(path), "dict")
    assert not dst.exists()


@pytest.mark.parametrize("layer", [0, 1, 99])
def test_export_gguf_layer_llama_cpp_cannot_hold(capsys, tmp_path, big_vector, layer):
    out = tmp_path / "v.gguf"
    result = run_cli(capsys, "export", "--vector", big_vector, "--format", "gguf", "--out", out, "--layer", layer)
    assert_user_error(*result, f"--layer {layer}")
    assert not out.exists() and not list(tmp_path.glob("*.partial"))


def test_export_unknown_format(capsys, tmp_path, big_vector):
    out = tmp_path / "v.bin"
    assert_user_error(*run_cli(capsys, "export", "--vector", big_vector, "--format", "onnx", "--out", out), "--format 'onnx'")
    assert not out.exists()


# -- models ----------------------------------------------------------------------

def test_models_list_downloads_nothing(capsys, tmp_path, monkeypatch):
    from personavec import models

    def forbidden(*args, **kwargs):
        raise AssertionError("models list must not download or convert")

    for name in ("_pip_download", "fetch_gguf", "pull", "convert_gguf"):
        monkeypatch.setattr(models.registry, name, forbidden)
    code, out, err = run_cli(capsys, "models", "list")
    assert code == 0, err
    for name in models.PACKAGED:
        assert name in out
    assert "smollm2-135m" in out and "(approx)" in out
    assert not (tmp_path / "cache" / "models").exists() or not any((tmp_path / "cache" / "models").rglob("*"))


def test_extract_refuses_an_unknown_recipe_before_loading_anything(capsys, tmp_path):
    out = tmp_path / "run"
    result = run_cli(capsys, "extract", "--model", tmp_path / "no-such-model", "--trait", "optimistic", "--judge",
                     "none", "--out", out, "--recipe", "stylish")
    assert_user_error(*result, "--recipe stylish", "paper, registers")
    assert not out.exists()
