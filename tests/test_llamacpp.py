"""The GGUF export steers llama.cpp itself the way personavec steers transformers (`make test-llamacpp`).

Two engines see the same prompt tokens: personavec's transformers hooks on the converted folder of
qwen2.5-coder-0.5b, and llama.cpp (llama-cpp-python, built by `make setup-llamacpp`) on the packaged GGUF file the
folder was converted from. The control vector comes from `personavec export --format gguf` and reaches llama.cpp
the way llama.cpp's own loader puts it there (common_control_vector_load_one: tensor `direction.N`, times its
strength, is row N-1 of an n_embd x n_layer buffer; llama_set_adapter_cvec adds that row to the output of 0-based
layer N). The two models differ a little (bf16 dequantised weights against llama.cpp's quantised kernels), so the
test compares what steering changes: the log-probability change of the top next tokens, unsteered to steered.
At the exported index llama.cpp must track personavec closely on every prompt (Pearson r > 0.95, relative
error |d_llama - d_pv| / |d_pv| < 0.15); one llama.cpp layer off either way (`direction.k = v[k]`, the k vs k+1
mistake, or the other way) must do worse on every prompt and have over 3 times the mean relative error.

Marker `llamacpp`: deselected by default; without llama-cpp-python the tests skip, except under
`PERSONAVEC_REQUIRE_LLAMACPP=1` (what `make test-llamacpp` sets), where they fail.
"""

import ctypes
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from personavec.chat import encode_chat, user_chat
from personavec.vectors import PersonaVector

pytestmark = [pytest.mark.llamacpp, pytest.mark.model]

MODEL = "qwen2.5-coder-0.5b"
PROMPTS = ("How do you feel about starting a new job next week?",
           "What do you think the next ten years will bring?",
           "My team lost the final match today. Any thoughts?")
TOP = 20  # tokens compared per prompt: the top TOP before steering and the top TOP after it (personavec's)
N_CONTRAST = 48  # chats per side for the optimism vector (of 240 in each experiments/data file)


def pearson(a, b) -> float:
    return float(np.corrcoef(np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64))[0, 1])


def log_softmax(logits) -> np.ndarray:
    x = np.asarray(logits, dtype=np.float64)
    x = x - x.max()
    return x - np.log(np.exp(x).sum())


class LlamaCpp:
    """A llama.cpp context on one GGUF model, through llama-cpp-python's C API: next-token log-probabilities for
    a token sequence, with or without a control vector."""

    def __init__(self, path, llama_cpp):
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        assert self.model, f"llama.cpp could not load {path}"
        cparams = llama_cpp.llama_context_default_params()
        cparams.n_ctx = cparams.n_batch = cparams.n_ubatch = 256
        cparams.n_threads = cparams.n_threads_batch = min(4, os.cpu_count() or 1)
        self.ctx = llama_cpp.llama_init_from_model(self.model, cparams)
        assert self.ctx, "llama.cpp could not create a context"
        self.n_layer = llama_cpp.llama_model_n_layer(self.model)
        self.n_embd = llama_cpp.llama_model_n_embd(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.model))

    def set_control_vector(self, buffer: np.ndarray | None, il_start: int = 1, il_end: int | None = None) -> None:
        """llama_set_adapter_cvec with the range llama.cpp's CLI uses by default (1..n_layer), or a given one
        (`--control-vector-layer-range START END`); None clears it."""
        if buffer is None:
            rc = self.lib.llama_set_adapter_cvec(self.ctx, None, 0, self.n_embd, -1, -1)
        else:
            # llama.cpp leaves a layer past the end of a shorter buffer as the previous vector set it, so every
            # layer (rows for layers 1..n_layer-1) is written each time: zeros where the file holds nothing
            full = np.zeros(self.n_embd * (self.n_layer - 1), dtype=np.float32)
            assert buffer.size <= full.size, "the control vector has more layers than the model"
            full[: buffer.size] = buffer
            rc = self.lib.llama_set_adapter_cvec(
                self.ctx, full.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), full.size,
                self.n_embd, il_start, self.n_layer if il_end is None else il_end)
        assert rc == 0, f"llama_set_adapter_cvec returned {rc}"

    def next_logprobs(self, ids: list[int]) -> np.ndarray:
        self.lib.llama_memory_clear(self.lib.llama_get_memory(self.ctx), True)
        tokens = (self.lib.llama_token * len(ids))(*ids)
        rc = self.lib.llama_decode(self.ctx, self.lib.llama_batch_get_one(tokens, len(ids)))
        assert rc == 0, f"llama_decode returned {rc}"
        logits = np.ctypeslib.as_array(self.lib.llama_get_logits_ith(self.ctx, -1), shape=(self.n_vocab,))
        return log_softmax(logits.copy())

    def close(self) -> None:
        self.lib.llama_free(self.ctx)
        self.lib.llama_model_free(self.model)


def control_vector_buffer(path, n_embd: int, strength: float, shift: int = 0, n_layer: int | None = None) -> np.ndarray:
    """What llama.cpp's loader makes of a control-vector file (common_control_vector_load_one): tensor
    `direction.N` (N >= 1), times the strength, at rows [N-1] of a flat n_embd x max(N) buffer. `shift` moves every
    tensor that many llama.cpp layers (the off-by-one mistakes this test must tell apart); a tensor shifted out of
    llama.cpp's layers 1..n_layer-1 is dropped."""
    import gguf

    rows = {}
    for tensor in gguf.GGUFReader(str(path)).tensors:
        match = re.fullmatch(r"direction\.(\d+)", tensor.name)
        if match:
            n = int(match.group(1))
            assert n >= 1, f"{path}: llama.cpp refuses {tensor.name}"
            if n + shift >= 1 and (n_layer is None or n + shift < n_layer):
                rows[n + shift] = np.asarray(tensor.data, dtype=np.float32).reshape(-1)
    assert rows, f"{path}: no direction.N tensors (shift {shift})"
    buffer = np.zeros(n_embd * max(rows), dtype=np.float32)
    for n, row in rows.items():
        assert row.size == n_embd
        buffer[(n - 1) * n_embd: n * n_embd] += strength * row
    return buffer


@pytest.fixture(scope="module")
def llama_cpp():
    if importlib.util.find_spec("llama_cpp") is None:
        if os.environ.get("PERSONAVEC_REQUIRE_LLAMACPP"):
            pytest.fail("PERSONAVEC_REQUIRE_LLAMACPP is set but llama_cpp cannot be imported (make setup-llamacpp)")
        pytest.skip("llama-cpp-python is not installed (make setup-llamacpp / make test-llamacpp)")
    import llama_cpp

    logging.getLogger("llama-cpp-python").setLevel(logging.ERROR)  # llama.cpp's load log goes through it
    return llama_cpp


@pytest.fixture(scope="module")
def engines(llama_cpp):
    from personavec.models import load_model
    from personavec.models.registry import fetch_gguf

    model, tok = load_model(MODEL, dtype="fp32")
    cpp = LlamaCpp(fetch_gguf(MODEL), llama_cpp)  # the packaged GGUF, kept in the cache after this
    yield model, tok, cpp
    cpp.close()


def hf_logprobs(model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = model(torch.tensor([ids])).logits[0, -1]
    return log_softmax(logits.numpy())


def run_export(capsys, *args) -> str:
    """`personavec export ARGS` through the real entry point; returns its stderr (where it logs)."""
    from personavec import cli

    capsys.readouterr()
    old, sys.argv = sys.argv, ["personavec", "export", *map(str, args)]
    try:
        cli.main()
    except SystemExit as exc:
        assert not exc.code, capsys.readouterr().err
    finally:
        sys.argv = old
    return capsys.readouterr().err


def printed_range(stderr: str) -> tuple[int, int]:
    match = re.search(r"--control-vector-layer-range (\d+) (\d+)", stderr)
    assert match, stderr
    return int(match.group(1)), int(match.group(2))


def compare(engines, vector: PersonaVector, layer: int, coef: float, gguf_path, layer_range=None,
            shifts=(0, -1, 1)) -> dict:
    """Per prompt and llama.cpp index shift: personavec's and llama.cpp's logprob changes (steered minus unsteered)
    over the union of personavec's top-TOP tokens before and after steering. With `layer_range`, llama.cpp steers
    only that range (shifted too), as `--control-vector-layer-range` does; else 1..n_layer, its default."""
    model, tok, cpp = engines
    rows = []
    for prompt in PROMPTS:
        ids = encode_chat(tok, user_chat(prompt), with_response=False).input_ids
        cpp.set_control_vector(None)
        base_hf, base_cpp = hf_logprobs(model, ids), cpp.next_logprobs(ids)
        with vector.apply(model, layer=layer, coef=coef, coef_mode="raw"):
            steered_hf = hf_logprobs(model, ids)
        tokens = np.union1d(np.argsort(-base_hf)[:TOP], np.argsort(-steered_hf)[:TOP])
        delta_hf = (steered_hf - base_hf)[tokens]
        row = {"base_r": pearson(base_hf[tokens], base_cpp[tokens]), "effect": float(np.abs(delta_hf).mean())}
        for shift in shifts:
            buffer = control_vector_buffer(gguf_path, cpp.n_embd, coef, shift, cpp.n_layer)
            if layer_range is None:
                cpp.set_control_vector(buffer)
            else:
                cpp.set_control_vector(buffer, layer_range[0] + shift, layer_range[1] + shift)
            delta_cpp = (cpp.next_logprobs(ids) - base_cpp)[tokens]
            row[shift] = {"r": pearson(delta_hf, delta_cpp),
                          "rel_err": float(np.linalg.norm(delta_cpp - delta_hf) / np.linalg.norm(delta_hf))}
        cpp.set_control_vector(None)
        row["cleared"] = float(np.abs(cpp.next_logprobs(ids)[tokens] - base_cpp[tokens]).max())
        rows.append(row)
    print(f"layer {layer} coef {coef}: " + "; ".join(
        f"shift {s:+d}: r " + "/".join(f"{r[s]['r']:.3f}" for r in rows) + ", rel. error "
        + "/".join(f"{r[s]['rel_err']:.2f}" for r in rows) for s in shifts)
        + "; effect " + "/".join(f"{r['effect']:.2f}" for r in rows) + " nats")
    return rows


def check(rows) -> None:
    for row in rows:
        assert row["base_r"] > 0.99, row  # the same model and tokens in both engines, before any steering
        assert row["effect"] > 0.5, row  # the steering moves these tokens by more than half a nat on average
        assert row["cleared"] < 1e-3, row  # clearing the control vector gives back the unsteered distribution
        assert row[0]["r"] > 0.95 and row[0]["rel_err"] < 0.15, row  # the exported index: what personavec did
        for wrong in (-1, 1):  # one llama.cpp layer off, either way
            assert row[wrong]["r"] < row[0]["r"], row
    for wrong in (-1, 1):
        assert np.mean([r[wrong]["rel_err"] for r in rows]) > 3 * np.mean([r[0]["rel_err"] for r in rows]), rows


LAYER = 12  # of 24: llama.cpp's direction.11


@pytest.fixture(scope="module")
def optimism(engines):
    """A persona vector as `personavec vector` makes it, from the repo's optimistic vs neutral answers."""
    from personavec.pipeline.contrast import contrastive_vector, read_contrast_files

    model, tok, _ = engines
    data = Path(__file__).resolve().parents[1] / "experiments" / "data"
    pos, neg = read_contrast_files(str(data / "optimistic_train.jsonl"), str(data / "neutral_train.jsonl"),
                                   "response_avg")
    vector, _ = contrastive_vector(model, tok, pos[:N_CONTRAST], neg[:N_CONTRAST], trait="optimistic",
                                   batch_size=8, show_progress=False)
    return vector


def test_optimism_vector_moves_llama_cpp_as_it_moves_personavec(engines, optimism, tmp_path, capsys):
    """`export --layer 12` (a file holding direction.11 alone), loaded as llama.cpp's CLI loads
    `--control-vector-scaled FILE 8`, against personavec steering layer 12 with raw coef 8."""
    source, out = tmp_path / "optimistic.safetensors", tmp_path / "optimistic.gguf"
    optimism.save(source)
    assert printed_range(run_export(capsys, "--vector", source, "--format", "gguf", "--out", out,
                                    "--layer", LAYER)) == (LAYER - 1, LAYER - 1)
    check(compare(engines, optimism, LAYER, 8.0, out))


def test_random_direction_through_the_printed_layer_range(engines, tmp_path, capsys):
    """A different random unit direction at every layer, exported whole (direction.1..23), steered in llama.cpp
    only over the layer range that `export --layer 12` prints: only the right row at the right place matches."""
    model, _, cpp = engines
    generator = torch.Generator().manual_seed(0)
    rows = torch.randn(cpp.n_layer + 1, cpp.n_embd, generator=generator)
    vector = PersonaVector(vectors=rows / rows.norm(dim=-1, keepdim=True), trait="random", model=MODEL)
    source, whole, single = (tmp_path / name for name in ("random.safetensors", "random.gguf", "random-12.gguf"))
    vector.save(source)
    run_export(capsys, "--vector", source, "--format", "gguf", "--out", whole)
    layer_range = printed_range(run_export(capsys, "--vector", source, "--format", "gguf", "--out", single,
                                           "--layer", LAYER))
    check(compare(engines, vector, LAYER, 16.0, whole, layer_range))
