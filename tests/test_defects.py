"""Defects found by trying the CLI as a new user: each test failed before its fix.

Commands run through `personavec.cli.main()` on the tiny random models of conftest.py (context 512 tokens; the
tiny tokenizer is character-level, so a 600-character message is longer than the context).
"""

import json
import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import CHATS
from test_cli import HIDDEN, N_LAYERS, assert_user_error, run_cli, write_jsonl

from personavec.errors import PersonavecError
from personavec.vectors import PersonaVector

LONG = "word " * 150  # 750 characters: 750 tokens of the tiny tokenizer, past the tiny model's 512


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("COLUMNS", "200")


@pytest.fixture
def vector_path(tmp_path):
    torch.manual_seed(1)
    return PersonaVector(vectors=torch.randn(N_LAYERS + 1, HIDDEN) * 30, trait="loud", layer=2).save(
        tmp_path / "v.safetensors")


def rows_of(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


# -- silent wrong results, mix-ups and hangs --------------------------------------------------------------------

def test_vector_skips_and_lists_chats_longer_than_the_context(capsys, tmp_path, tiny_folder):
    from personavec.models import load_model
    from personavec.pipeline.contrast import contrastive_vector

    long_chat = [{"role": "user", "content": "tell me"}, {"role": "assistant", "content": LONG}]
    pos = write_jsonl(tmp_path / "pos.jsonl", [CHATS[0], long_chat, CHATS[1]])
    neg = write_jsonl(tmp_path / "neg.jsonl", [CHATS[2], CHATS[0][:1] + [{"role": "assistant", "content": "no way"}]])
    out = tmp_path / "v.safetensors"
    code, _, err = run_cli(capsys, "vector", "--model", tiny_folder, "--pos", pos, "--neg", neg, "--out", out)
    assert code == 0, err
    assert f"{pos}:2" in err and "longer than the model's context (512 tokens)" in err
    assert "2 pos / 2 neg, 1 pos skipped" in err
    vec = PersonaVector.load(out)
    assert (vec.n_pos, vec.n_neg) == (2, 2)
    # exactly the vector of the chats that fit: the skipped chat is not a zero row in the mean
    lm, tok = load_model(tiny_folder)
    expected, _ = contrastive_vector(lm, tok, [CHATS[0], CHATS[1]], [CHATS[2], CHATS[0][:1] + [
        {"role": "assistant", "content": "no way"}]], show_progress=False)
    torch.testing.assert_close(vec.vectors, expected.vectors)


def test_vector_refuses_a_side_left_empty(capsys, tmp_path, tiny_folder):
    pos = write_jsonl(tmp_path / "pos.jsonl", [[{"role": "user", "content": "q"}, {"role": "assistant", "content": LONG}]])
    neg = write_jsonl(tmp_path / "neg.jsonl", [CHATS[2]])
    out = tmp_path / "v.safetensors"
    result = run_cli(capsys, "vector", "--model", tiny_folder, "--pos", pos, "--neg", neg, "--out", out)
    assert_user_error(*result, "every pos chat is longer than the model's context", f"{pos}:1")
    assert not out.exists()


def test_from_activations_drops_skipped_rows():
    from personavec.activations import Activations

    pos = Activations(layers=[0, 1], response_avg=torch.stack([torch.ones(2, 3), torch.zeros(2, 3)]), skipped=[1])
    neg = Activations(layers=[0, 1], response_avg=torch.zeros(2, 2, 3) - 1)
    vec = PersonaVector.from_activations(pos, neg)
    torch.testing.assert_close(vec.vectors, torch.full((2, 3), 2.0))  # 1 - (-1), not (1 + 0) / 2 - (-1)
    assert (vec.n_pos, vec.n_neg) == (1, 2)
    with pytest.raises(PersonavecError, match="no chat is left"):
        PersonaVector.from_activations(Activations(layers=[0, 1], response_avg=torch.ones(1, 2, 3), skipped=[0]), neg)


def test_steer_input_skips_and_lists_prompts_longer_than_the_context(capsys, tmp_path, tiny_folder, vector_path,
                                                                     monkeypatch):
    import personavec.generate as gen

    long_prompt = [{"role": "user", "content": LONG}]
    src = write_jsonl(tmp_path / "in.jsonl", [CHATS[0], long_prompt], extra={"id": "x"})
    dst = tmp_path / "out.jsonl"
    fed = []
    real = gen.generate

    def spy(model, tokenizer, chats, *args, **kwargs):
        fed.extend(chats)
        return real(model, tokenizer, chats, *args, **kwargs)

    monkeypatch.setattr(gen, "generate", spy)
    code, out, err = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", vector_path, "--coef", 1,
                             "--input", src, "--output", dst, "--max-new-tokens", 3)
    assert code == 0, err
    assert long_prompt not in fed and fed == [CHATS[0][:-1]]  # the long prompt is never generated from
    rows = rows_of(dst)
    assert len(rows) == 2 and rows[0]["messages"][-1]["role"] == "assistant" and "skipped" not in rows[0]["steering"]
    assert rows[1]["messages"] == long_prompt and rows[1]["id"] == "x"
    assert rows[1]["steering"]["skipped"] == "prompt longer than the model's context (512 tokens)"
    assert f"{src}:2" in err and "wrote 1 answers" in err


def test_judge_skips_and_lists_chats_longer_than_the_judge_context(capsys, tmp_path, monkeypatch):
    from tiny import save_tiny

    import personavec.judge.local as local

    judge = "local:" + save_tiny(tmp_path / "judge")  # context 8192 tokens
    huge = "word " * 2500  # 10000 tokens (the tiny tokenizer drops spaces)
    src = write_jsonl(tmp_path / "in.jsonl", [CHATS[0], [{"role": "user", "content": "q"},
                                                         {"role": "assistant", "content": huge}]])
    dst = tmp_path / "out.jsonl"
    judged = []
    real = local.LocalJudge.number_probs

    def spy(self, prompts):
        judged.extend(prompts)
        return real(self, prompts)

    monkeypatch.setattr(local.LocalJudge, "number_probs", spy)
    code, _, err = run_cli(capsys, "judge", "--judge", judge, "--trait", "optimistic", "--input", src,
                           "--output", dst)
    assert code == 0, err
    rows = rows_of(dst)
    assert rows[1]["judge"] == {"trait_score": None, "coherence": None, "scheme": "score100",
                                "skipped": "longer than the judge's context (8192 tokens)"}
    assert "skipped" not in rows[0]["judge"] and len(judged) == 2  # trait and coherence of the first chat only
    assert all(huge not in p for p in judged)
    assert f"{src}:2" in err and "judged 1 answers" in err


@pytest.mark.parametrize("args, flag", [
    (["steer", "--coef", "1", "--prompt", "hi", "--batch-size", "-3"], "--batch-size -3"),
    (["steer", "--coef", "1", "--prompt", "hi", "--batch-size", "0"], "--batch-size 0"),
    (["steer", "--coef", "1", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens 0"),
    (["steer", "--coef", "1", "--prompt", "hi", "--max-new-tokens", "-2"], "--max-new-tokens -2"),
    (["steer", "--coef", "1", "--prompt", "hi", "--temperature", "-1"], "--temperature -1.0"),
    (["steer", "--coef", "nan", "--prompt", "hi"], "--coef nan"),
    (["steer", "--coef", "inf", "--prompt", "hi"], "--coef inf"),
    (["extract", "--trait", "optimistic", "--judge", "none", "--out", "x", "--questions", "0"], "--questions 0"),
    (["extract", "--trait", "optimistic", "--judge", "none", "--out", "x", "--questions", "-1"], "--questions -1"),
    (["extract", "--trait", "optimistic", "--judge", "none", "--out", "x", "--samples-per-question", "0"],
     "--samples-per-question 0"),
    (["extract", "--trait", "optimistic", "--judge", "none", "--out", "x", "--batch-size", "0"], "--batch-size 0"),
    (["extract", "--trait", "optimistic", "--judge", "none", "--out", "x", "--pos-threshold", "nan"],
     "--pos-threshold nan"),
    (["screen", "--data", "d.jsonl", "--output", "o.jsonl", "--batch-size", "-1"], "--batch-size -1"),
    (["screen", "--data", "d.jsonl", "--output", "o.jsonl", "--keep-below", "nan"], "--keep-below nan"),
    (["screen", "--data", "d.jsonl", "--output", "o.jsonl", "--top-k", "-1"], "--top-k -1"),
    (["screen", "--data", "d.jsonl", "--output", "o.jsonl", "--drop-top", "1.5"], "--drop-top 1.5"),
    (["monitor", "--input", "d.jsonl", "--output", "o.jsonl", "--threshold", "nan"], "--threshold nan"),
    (["monitor", "--input", "d.jsonl", "--output", "o.jsonl", "--max-length", "0"], "--max-length 0"),
    (["evaluate", "--trait", "optimistic", "--coefs", "0,1", "--judge", "none", "--out", "e", "--batch-size", "0"],
     "--batch-size 0"),
])
def test_numeric_flags_are_checked_when_parsed(capsys, tmp_path, args, flag):
    command, rest = args[0], args[1:]
    model = [] if command == "judge" else ["--model", "no-such-model"]
    vector = ["--vector", "v.safetensors"] if command in ("steer", "screen", "monitor", "evaluate") else []
    result = run_cli(capsys, command, *model, *vector, *rest)
    assert_user_error(*result, f"error: {flag}:")
    assert not (tmp_path / "x").exists() and not (tmp_path / "e").exists()


def test_judge_batch_size_is_checked(capsys, tmp_path):
    result = run_cli(capsys, "judge", "--judge", "local:no-such-model", "--trait", "optimistic", "--input", "i.jsonl",
                     "--output", "o.jsonl", "--batch-size", "0")
    assert_user_error(*result, "error: --batch-size 0: must be at least 1")


def test_library_generation_settings_are_checked(tiny_llama):
    from personavec.generate import generate

    model, tok = tiny_llama
    for kwargs, needle in ((dict(batch_size=-3), "batch_size=-3"), (dict(max_new_tokens=0), "max_new_tokens=0"),
                           (dict(temperature=-1.0), "temperature=-1.0")):
        with pytest.raises(PersonavecError, match=needle):
            generate(model, tok, [CHATS[0][:1]], show_progress=False, **kwargs)


def test_extract_questions_are_checked_in_the_library():
    from personavec.pipeline.extract import extraction_items
    from personavec.traits import load_trait

    with pytest.raises(PersonavecError, match="questions=0"):
        extraction_items(load_trait("optimistic"), 0, 1)
    with pytest.raises(PersonavecError, match="samples_per_question=0"):
        extraction_items(load_trait("optimistic"), 2, 0)


def test_a_second_monitor_into_a_locked_run_folder_is_refused(capsys, tmp_path, tiny_folder, vector_path):
    import fcntl

    data = write_jsonl(tmp_path / "d.jsonl", [c[:-1] for c in CHATS])
    output = tmp_path / "mon.jsonl"
    run = tmp_path / "mon_run"
    run.mkdir()
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)  # another run holds the folder
    fcntl.flock(fd, fcntl.LOCK_EX)
    try:
        result = run_cli(capsys, "monitor", "--model", tiny_folder, "--vector", vector_path, "--input", data,
                         "--output", output)
        assert_user_error(*result, f"{run} is in use by another personavec run")
        assert not output.exists() and not (run / "config.json").exists()
    finally:
        os.close(fd)
    code, _, err = run_cli(capsys, "monitor", "--model", tiny_folder, "--vector", vector_path, "--input", data,
                           "--output", output)
    assert code == 0, err  # free again (the leftover .lock file is not "another run's" content)
    assert json.loads((run / "config.json").read_text())["input"] == str(data) and len(rows_of(output)) == 3


def test_run_folder_lock_is_shared_within_a_process_and_released(tmp_path):
    import fcntl

    from personavec.runs import RunDir

    first = RunDir(tmp_path / "r", {"command": "x"})
    again = RunDir(tmp_path / "r", {"command": "x"})  # the same process resuming: fine
    probe = os.open(tmp_path / "r" / ".lock", os.O_RDWR)
    with pytest.raises(OSError):
        fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)
    del first, again
    fcntl.flock(probe, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released with the last RunDir
    os.close(probe)


# -- tracebacks instead of one-line errors ------------------------------------------------------------------------

def test_non_utf8_input_names_the_file_and_line(capsys, tmp_path):
    from personavec.calibration import read_calibration
    from personavec.traits import load_trait

    good = json.dumps({"messages": CHATS[0]}).encode()
    bad = tmp_path / "latin1.jsonl"
    bad.write_bytes(good + b"\n" + '{"messages": [{"role": "user", "content": "caf\u00e9"}]}'.encode("latin-1") + b"\n")
    for args in (["vector", "--model", "m", "--pos", bad, "--neg", bad, "--out", "v.safetensors"],
                 ["judge", "--judge", "local:m", "--trait", "optimistic", "--input", bad, "--output", "o.jsonl"],
                 ["steer", "--model", "m", "--vector", "v.safetensors", "--coef", "1", "--input", bad, "--output", "o"]):
        if args[0] == "steer":
            PersonaVector(vectors=torch.ones(N_LAYERS + 1, HIDDEN)).save(tmp_path / "v.safetensors")
        assert_user_error(*run_cli(capsys, *args), f"{bad}:2: not valid UTF-8 (byte 0xe9")
    trait = tmp_path / "t.json"
    trait.write_bytes('{"name": "caf\u00e9"}'.encode("latin-1"))
    with pytest.raises(PersonavecError, match="not valid UTF-8"):
        load_trait(str(trait))
    with pytest.raises(PersonavecError, match=f"{trait}:1: not valid UTF-8"):
        read_calibration(trait)


def test_a_bom_at_the_start_of_a_chat_file_is_fine(tmp_path):
    from personavec.chat import read_chats

    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps({"messages": CHATS[0]}).encode() + b"\n")
    assert read_chats(path)[0].messages == CHATS[0]


@pytest.mark.parametrize("command", ["vector", "steer", "export", "monitor", "screen", "judge", "judge-check"])
def test_an_output_path_that_is_a_folder_is_refused_before_any_work(capsys, tmp_path, command, vector_path):
    folder = tmp_path / "outdir"
    folder.mkdir()
    chats = write_jsonl(tmp_path / "c.jsonl", CHATS)
    args = {
        "vector": ["--model", "no-such-model", "--pos", chats, "--neg", chats, "--out", folder],
        "steer": ["--model", "no-such-model", "--vector", vector_path, "--coef", 1, "--input", chats,
                  "--output", folder],
        "export": ["--vector", vector_path, "--format", "pt", "--out", folder],
        "monitor": ["--model", "no-such-model", "--vector", vector_path, "--input", chats, "--output", folder],
        "screen": ["--model", "no-such-model", "--vector", vector_path, "--data", chats, "--output", folder],
        "judge": ["--judge", "local:no-such-model", "--trait", "optimistic", "--input", chats, "--output", folder],
        "judge-check": ["--judge", "local:no-such-model", "--save", folder],
    }[command]
    flag = {"vector": "--out", "export": "--out", "judge-check": "--save"}.get(command, "--output")
    assert_user_error(*run_cli(capsys, command, *args), f"{flag} {folder}: is a folder")


def test_atomic_write_to_a_folder_is_a_one_line_error(tmp_path):
    with pytest.raises(PersonavecError, match="is a folder"):
        PersonaVector(vectors=torch.ones(2, 3)).save(tmp_path)


def test_judge_input_folder(capsys, tmp_path):
    result = run_cli(capsys, "judge", "--judge", "local:no-such-model", "--trait", "optimistic", "--input", tmp_path,
                     "--output", tmp_path / "o.jsonl")
    assert_user_error(*result, f"{tmp_path}: is a folder, not a file")


def test_extract_out_that_is_a_file(capsys, tmp_path):
    existing = tmp_path / "taken"
    existing.write_text("x")
    result = run_cli(capsys, "extract", "--model", "no-such-model", "--trait", "optimistic", "--judge", "none",
                     "--out", existing)
    assert_user_error(*result, f"--out {existing}: is a file")
    with pytest.raises(PersonavecError, match="is a file, not a run folder"):
        from personavec.runs import RunDir

        RunDir(existing, {"command": "x"})


def test_usage_errors_are_one_line(capsys):
    for args, needle in ((["steer", "--vector", "v"], "error: Missing option '--model'"),
                         (["steer", "--bogus"], "error: No such option: --bogus"),
                         (["steer", "--model", "m", "--vector", "v", "--coef", "abc"], "error: Invalid value for '--coef'")):
        code, out, err = run_cli(capsys, *args)
        assert_user_error(code, out, err, needle)
        assert len(err.strip().splitlines()) == 1 and "╭" not in err


def test_usage_error_real_process(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "personavec.cli", "export", "--vector", "v"], capture_output=True,
                          text=True, timeout=120, cwd=tmp_path)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.strip().splitlines() == ["error: Missing option '--format'. (see `python -m personavec.cli "
                                                "export --help`)"]


# -- misleading messages -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("command", ["steer", "monitor", "screen"])
def test_a_vector_for_another_model_says_so_before_asking_for_a_layer(capsys, tmp_path, tiny_folder, command):
    path = PersonaVector(vectors=torch.randn(N_LAYERS + 1, 32)).save(tmp_path / "small.safetensors")  # no layer
    chats = write_jsonl(tmp_path / "c.jsonl", CHATS)
    tail = {"steer": ["--coef", 1, "--prompt", "hi"], "monitor": ["--input", chats, "--output", tmp_path / "o.jsonl"],
            "screen": ["--data", chats, "--output", tmp_path / "o.jsonl", "--approx"]}[command]
    result = run_cli(capsys, command, "--model", tiny_folder, "--vector", path, *tail)
    assert_user_error(*result, str(path), "hidden size 32", "hidden size 64")


def test_single_layer_gguf_export_reads_back_and_steers(capsys, tmp_path, tiny_folder, vector_path):
    import gguf

    out = tmp_path / "one.gguf"
    code, _, err = run_cli(capsys, "export", "--vector", vector_path, "--format", "gguf", "--out", out, "--layer", 2)
    assert code == 0, err
    reader = gguf.GGUFReader(str(out))
    assert [t.name for t in reader.tensors] == ["direction.1"]  # llama.cpp numbering: direction.k = v[k + 1]
    back = PersonaVector.load(out)
    assert (back.n_layers, back.layer, back.trait) == (N_LAYERS, 2, "loud")
    torch.testing.assert_close(back.vectors[2], PersonaVector.load(vector_path).vectors[2], rtol=0, atol=0)
    assert not back.vectors[3].any()
    steered = [run_cli(capsys, "steer", "--model", tiny_folder, "--vector", v, "--coef", 1, "--prompt", "hi",
                       "--max-new-tokens", 4) for v in (out, vector_path)]
    assert steered[0][0] == 0, steered[0][2]
    assert steered[0][1] == steered[1][1]
    # another layer of the single-layer file holds no direction: refused, not silently a zero vector
    result = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", out, "--coef", 1, "--prompt", "hi",
                     "--layer", 3)
    assert_user_error(*result, "the vector at layer 3 is all zeros")


def test_a_foreign_gguf_without_the_layer_count_still_reads(tmp_path):
    import gguf
    import numpy as np

    path = tmp_path / "foreign.gguf"
    writer = gguf.GGUFWriter(str(path), "controlvector")
    writer.add_tensor("direction.1", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    vec = PersonaVector.load(path)
    assert vec.n_layers == 2 and vec.layer == 2


def test_a_non_finite_coefficient_is_blamed_on_the_coefficient():
    vec = PersonaVector(vectors=torch.ones(N_LAYERS + 1, HIDDEN), layer=2)
    for coef in (math.nan, math.inf):
        with pytest.raises(PersonavecError, match=f"coef={coef}: the steering coefficient must be a finite number"):
            vec.delta(2, coef)


def test_a_corrupt_pt_never_suggests_unpickling(capsys, tmp_path, tiny_folder):
    path = tmp_path / "junk.pt"
    path.write_bytes(b"not a torch file at all" * 4)
    result = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", path, "--coef", 1, "--prompt", "hi")
    assert_user_error(*result, str(path), "not a readable .pt tensor file")
    assert "weights_only=False" not in result[2] and "will likely succeed" not in result[2]


def test_an_empty_answer_names_the_file_and_line(capsys, tmp_path, tiny_folder, vector_path):
    pos = write_jsonl(tmp_path / "pos.jsonl", [CHATS[0], [{"role": "user", "content": "q"},
                                                          {"role": "assistant", "content": ""}]])
    result = run_cli(capsys, "vector", "--model", tiny_folder, "--pos", pos, "--neg", pos, "--out", "v2.safetensors")
    assert_user_error(*result, f"{pos}:2: the final assistant message is empty")
    result = run_cli(capsys, "monitor", "--model", tiny_folder, "--vector", vector_path, "--input", pos,
                     "--output", "m.jsonl", "--position", "response_avg")
    assert_user_error(*result, f"{pos}:2: the final assistant message is empty")
    assert not (tmp_path / "m_run").exists()


def test_extract_layers_are_checked_before_generating(capsys, tmp_path, tiny_folder, monkeypatch):
    import personavec.pipeline.extract as extract

    monkeypatch.setattr(extract, "generate_missing", lambda *a, **k: pytest.fail("generated before checking --layers"))
    for layers, needle in (("0,999", "--layers 0,999: candidate layers must lie in 1..3"),
                           ("2,1.5", "--layers '2,1.5': give comma-separated whole numbers")):
        result = run_cli(capsys, "extract", "--model", tiny_folder, "--trait", "optimistic", "--judge", "none",
                         "--out", tmp_path / "x", "--layers", layers)
        assert_user_error(*result, needle)
    assert not (tmp_path / "x" / "responses.jsonl").exists()


def test_evaluate_without_a_judge_is_refused_up_front(capsys, tmp_path, vector_path):
    result = run_cli(capsys, "evaluate", "--model", "no-such-model", "--trait", "optimistic", "--vector", vector_path,
                     "--coefs", "-1,0,1", "--judge", "none", "--out", tmp_path / "e")
    assert_user_error(*result, "--judge none: evaluate scores the steered answers", "needs a judge")
    assert not (tmp_path / "e").exists()


def test_library_errors_name_parameters_and_cli_errors_name_flags(capsys, tmp_path, tiny_llama, tiny_folder):
    from personavec.chat import ChatRecord
    from personavec.pipeline.monitor import monitor_chats

    model, tok = tiny_llama
    vec = PersonaVector(vectors=torch.randn(N_LAYERS + 1, HIDDEN))  # records no layer
    with pytest.raises(PersonavecError, match="records no layer; pass layer=$"):
        monitor_chats(model, tok, [ChatRecord(CHATS[0])], vec)
    assert monitor_chats(model, tok, [ChatRecord(CHATS[0])], vec, layer=2, show_progress=False)[0]["persona"]["layer"] == 2
    path = vec.save(tmp_path / "nolayer.safetensors")
    result = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", path, "--coef", 1, "--prompt", "hi")
    assert_user_error(*result, "records no layer; pass --layer")


def test_a_hub_id_not_in_the_cache_fails_fast_when_the_hub_is_unreachable(tmp_path):
    vector = PersonaVector(vectors=torch.ones(N_LAYERS + 1, HIDDEN), layer=2).save(tmp_path / "v.safetensors")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    env.update(HF_HOME=str(tmp_path / "hf"), HF_ENDPOINT="http://127.0.0.1:9", PERSONAVEC_CACHE=str(tmp_path / "c"))
    proc = subprocess.run([sys.executable, "-m", "personavec.cli", "steer", "--model", "someone/some-model",
                           "--vector", vector, "--coef", "1", "--prompt", "hi"], capture_output=True, text=True,
                          timeout=120, cwd=tmp_path, env=env)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: cannot load model 'someone/some-model': it is not in the "
                                                   "local Hugging Face cache"), proc.stderr
    assert "http://127.0.0.1:9 cannot be reached" in lines[0]
    # No wall-clock limit here (shared, noisy machine): one stderr line means transformers' retry loop, which
    # logs a line per attempt for about 50 s, never ran.


def test_offline_hub_id_says_so(tmp_path, monkeypatch):
    from personavec.models import loading

    calls = []

    def load(**kwargs):
        calls.append(kwargs)
        raise OSError("not cached")

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PersonavecError, match="HF_HUB_OFFLINE is set"):
        loading._load_hub_id("someone/some-model", load)
    assert calls == [{"local_files_only": True}]


# -- cosmetic -------------------------------------------------------------------------------------------------------

def test_tables_keep_names_and_paths_whole_in_a_pipe(capsys, tmp_path, monkeypatch):
    from personavec.models import PACKAGED, converted_path
    from personavec.traits import list_traits, load_trait

    monkeypatch.setenv("COLUMNS", "40")
    folder = converted_path("qwen2.5-coder-1.5b")
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    code, out, err = run_cli(capsys, "models", "list")
    assert code == 0, err
    for name, spec in PACKAGED.items():
        assert name in out and spec.title in out
    assert str(folder) in out and "…" not in out
    code, out, err = run_cli(capsys, "traits", "list")
    assert code == 0, err
    for name in list_traits():
        trait = load_trait(name)
        assert any(name in line and trait.description in line for line in out.splitlines()), name


def test_outputs_honour_the_umask(tmp_path):
    from personavec.chat import write_jsonl as write

    vec = PersonaVector(vectors=torch.ones(2, 3))
    old = os.umask(0o022)
    try:
        assert os.stat(vec.save(tmp_path / "a.safetensors")).st_mode & 0o777 == 0o644
        assert os.stat(write(tmp_path / "a.jsonl", [{"x": 1}])).st_mode & 0o777 == 0o644
        os.umask(0o077)
        assert os.stat(vec.save(tmp_path / "b.safetensors")).st_mode & 0o777 == 0o600
    finally:
        os.umask(old)


def test_help_has_no_placeholder_on_flags_and_keeps_defaults_whole(capsys, monkeypatch):
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run_cli(capsys, "finetune", "--help")
    assert code == 0
    assert "<bool>" not in out
    force = next(line for line in out.splitlines() if "--force" in line)
    assert "overwrite" in force
    flat = " ".join(out.replace("│", " ").split())
    assert "q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in flat and "gate_pr…" not in out


def test_library_warnings_are_one_line(capsys, tmp_path, tiny_folder, vector_path):
    data = write_jsonl(tmp_path / "d.jsonl", [c[:-1] for c in CHATS])
    code, _, err = run_cli(capsys, "monitor", "--model", tiny_folder, "--vector", vector_path, "--input", data,
                           "--output", tmp_path / "m.jsonl", "--max-length", "12")
    assert code == 0, err
    line = next(line for line in err.splitlines() if "skipped" in line)
    assert line.startswith("warning: skipped") and "UserWarning" not in err and "warnings.warn" not in err


@pytest.mark.parametrize("command", ["steer", "monitor"])
def test_an_all_zero_vector_is_refused(capsys, tmp_path, tiny_folder, command):
    path = PersonaVector(vectors=torch.zeros(N_LAYERS + 1, HIDDEN), layer=2).save(tmp_path / "zero.safetensors")
    data = write_jsonl(tmp_path / "d.jsonl", CHATS)
    tail = ["--coef", 1, "--prompt", "hi"] if command == "steer" else ["--input", data, "--output", "m.jsonl"]
    result = run_cli(capsys, command, "--model", tiny_folder, "--vector", path, *tail)
    assert_user_error(*result, "the vector at layer 2 is all zeros")


def test_export_refuses_a_suffix_that_contradicts_the_format(capsys, tmp_path, vector_path):
    for fmt, name in (("pt", "x.gguf"), ("gguf", "x.pt"), ("pt", "x.safetensors")):
        result = run_cli(capsys, "export", "--vector", vector_path, "--format", fmt, "--out", tmp_path / name)
        assert_user_error(*result, f"--out {tmp_path / name}", f"--format {fmt}")
        assert not (tmp_path / name).exists()


def test_steer_prompt_longer_than_the_context_is_refused(capsys, tiny_folder, vector_path):
    result = run_cli(capsys, "steer", "--model", tiny_folder, "--vector", vector_path, "--coef", 1, "--prompt", LONG)
    assert_user_error(*result, "--prompt is longer than the model's context (512 tokens)")
