"""The README's notebook code runs as written, on smollm2-135m (inputs it leaves to the reader are provided here)."""

import json
import re
from pathlib import Path

import pytest

pytestmark = pytest.mark.model

README = Path(__file__).resolve().parents[1] / "README.md"


def python_blocks() -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", README.read_text(encoding="utf-8"), flags=re.S | re.M)


def test_the_readme_has_notebook_code():
    blocks = python_blocks()
    assert len(blocks) >= 2 and any("monitor_chats" in b for b in blocks)


def test_readme_python_blocks_run(tmp_path, monkeypatch):
    from personavec.cache import cache_dir
    from personavec.pipeline.contrast import builtin_contrast

    models = cache_dir() / "models"  # the packaged model, fetched once per machine
    monkeypatch.chdir(tmp_path)
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "models").symlink_to(models, target_is_directory=True)
    monkeypatch.setenv("PERSONAVEC_CACHE", str(tmp_path / "cache"))  # base answers and judge calls stay here
    # What the README leaves to the reader: contrastive chats, prompts to monitor, training data to screen.
    pos, neg = builtin_contrast()
    chats = [{"messages": pos[0][:-1]}, {"messages": neg[1][:-1]}]
    (tmp_path / "prompts.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    (tmp_path / "train.jsonl").write_text("".join(json.dumps({"messages": m}) + "\n" for m in (pos[2], neg[2])))
    namespace = {"pos_chats": pos[:6], "neg_chats": neg[:6]}
    servers = []
    for block in python_blocks():
        if "OpenAI(base_url=" in block:  # the server's client example: against a real server on a free port
            block = block.replace("http://127.0.0.1:8000", serve_readme_vector(tmp_path, namespace, servers))
        exec(compile(block, str(README), "exec"), namespace)  # noqa: S102 - our own README
    for server, service in servers:
        server.stop()
        service.close()
    assert namespace["reply"].model_extra["persona"]["prompt"]["optimistic"]["layer"] == 15
    assert (tmp_path / "optimistic.safetensors").exists()
    assert len(namespace["rows"]) == 2 and all(r["persona"]["layer"] == 15 for r in namespace["rows"])
    assert len(namespace["scores"]) == 2 and namespace["scores"][0]["projection_difference"] is not None
    assert namespace["plain"] != namespace["amplified"] or namespace["plain"] != namespace["suppressed"]


def serve_readme_vector(tmp_path, namespace, servers) -> str:
    """`personavec serve --vector optimistic.safetensors --api-key KEY`, in-process, on the notebook's model."""
    pytest.importorskip("fastapi")
    from test_serve import Server

    from personavec.serve.app import create_app
    from personavec.serve.service import PersonaService
    from personavec.backends import as_backend
    from personavec.vectors import PersonaVector

    vector = PersonaVector.load(tmp_path / "optimistic.safetensors")
    service = PersonaService(as_backend(namespace["model"], namespace["tok"]), [vector], model_name="smollm2-135m")
    server = Server(create_app(service, api_key="KEY"))
    servers.append((server, service))
    return server.url
