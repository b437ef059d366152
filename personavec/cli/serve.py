"""The persona server: `personavec serve`."""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Optional

import typer

from ..errors import PersonavecError
from .common import engine_mode_option, steering_slots_option, load_engine_model, log, output_file, positive_float, positive_int


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve_cmd(
    model: str = typer.Option("smollm2-135m", "--model", help="packaged short name, hub id or local folder"),
    vector_paths: Optional[list[Path]] = typer.Option(None, "--vector", help="a vector file to serve (repeat for more); "
                                                      "the trait name comes from its metadata"),
    traits: str = typer.Option("all", "--traits", help="comma-separated trait names among the vectors, or all"),
    guard_rules: Optional[list[str]] = typer.Option(None, "--guard", help="TRAIT>X:flag | TRAIT>X:steer=C | "
                                                    "TRAIT:cap=X (repeat for more); applies to every request"),
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    api_key: Optional[str] = typer.Option(None, "--api-key", envvar="PERSONAVEC_API_KEY",
                                          help="require `Authorization: Bearer KEY` (or env PERSONAVEC_API_KEY)"),
    insecure: bool = typer.Option(False, "--insecure", help="allow a non-loopback --host without --api-key"),
    log_path: Optional[Path] = typer.Option(None, "--log", help="append one JSON line per request (readings, actions)"),
    log_content: bool = typer.Option(False, "--log-content", help="also log message text and answers"),
    dtype: str = typer.Option("auto", "--dtype", help="auto | bf16 | fp32"),
    engine: str = typer.Option("hf", "--engine", help="hf | vllm (continuous batching; the optional extra)"),
    engine_mode: Optional[str] = engine_mode_option(),
    max_steering_slots: Optional[int] = steering_slots_option(),
    tensor_parallel_size: int = typer.Option(1, "--tensor-parallel-size", help="vllm: GPUs per model"),
    max_batch: int = typer.Option(32, "--max-batch", callback=positive_int, help="requests batched together at most"),
    batch_window_ms: float = typer.Option(10.0, "--batch-window-ms", callback=positive_float, help="how long the first request of a batch "
                                          "waits for others"),
    max_tokens_limit: int = typer.Option(2048, "--max-tokens-limit", callback=positive_int, help="the most max_tokens a request may ask"),
    default_max_tokens: int = typer.Option(256, "--default-max-tokens", callback=positive_int, help="max_tokens when a request gives none"),
    max_body_bytes: int = typer.Option(1 << 20, "--max-body-bytes", callback=positive_int, help="larger request bodies get 413"),
) -> None:
    """An OpenAI-compatible server that steers per request, reads each answer's persona, and guards it."""
    from ..serve.app import INSTALL_HINT, Limits, RequestLog
    from ..serve.guards import parse_guard

    try:
        import uvicorn  # noqa: F401
        from ..serve.app import create_app
    except ImportError:
        raise PersonavecError(INSTALL_HINT) from None
    if not _is_loopback(host) and not api_key and not insecure:
        raise PersonavecError(f"--host {host} is reachable from other machines: pass --api-key KEY (or --insecure)")
    if not 1 <= port <= 65535:
        raise PersonavecError(f"--port {port}: use 1..65535")
    output_file(log_path, "--log")
    if default_max_tokens > max_tokens_limit:
        raise PersonavecError("--default-max-tokens must not exceed --max-tokens-limit")
    guards = [parse_guard(rule) for rule in guard_rules or []]
    from ..vectors import PersonaVector

    vectors = [PersonaVector.load(p) for p in vector_paths or []]
    if traits != "all":
        wanted = [t.strip() for t in traits.split(",") if t.strip()]
        have = {v.trait: v for v in vectors}
        missing = [t for t in wanted if t not in have]
        if missing:
            raise PersonavecError(f"--traits: no vector for {missing[0]!r}; given: {', '.join(have) or 'none'}")
        vectors = [have[t] for t in wanted]
    from ..serve.service import PersonaService, served_layers

    backend, _ = load_engine_model(model, engine, dtype, tensor_parallel_size, **served_layers(vectors))

    service = PersonaService(backend, vectors, guards, model_name=model, max_batch=max_batch,
                             batch_window_s=batch_window_ms / 1000)
    app = create_app(service, api_key=api_key,
                     limits=Limits(max_body_bytes=max_body_bytes, max_tokens=max_tokens_limit,
                                   default_max_tokens=default_max_tokens),
                     log=RequestLog(log_path, content=log_content))
    log(f"serving {model} with traits {', '.join(service.traits) or 'none'} on http://{host}:{port} "
        f"(dashboard at /, OpenAI API at /v1)")
    uvicorn.run(app, host=host, port=port, log_level="warning")


def register(app: typer.Typer) -> None:
    app.command("serve")(serve_cmd)
