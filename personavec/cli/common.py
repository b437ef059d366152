"""Helpers shared by the command groups: stderr logging and the one place a command loads a model for an engine."""

from __future__ import annotations

import sys


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def load_engine_model(model: str, engine: str, dtype: str = "auto", tensor_parallel_size: int = 1,
                      trust_remote_code: bool = False):
    """`(backend, tokenizer)` for `--engine`: every command that takes `--engine` loads its model here. The backend
    goes wherever the library takes a model."""
    from ..backends import load_backend

    backend = load_backend(model, engine, dtype, tensor_parallel_size, trust_remote_code)
    return backend, backend.tokenizer
