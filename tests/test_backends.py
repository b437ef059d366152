"""The backend protocol: per-row steering on transformers, checked against separate runs and hidden_states."""

import ast
from pathlib import Path

import pytest
import torch
from conftest import CHATS

from personavec.backends import HFBackend, Steering, as_backend, load_backend
from personavec.backends.hf import row_steering
from personavec.chat import encode_chat, user_chat
from personavec.errors import PersonavecError
from personavec.generate import generate
from personavec.steering import add_vectors

PROMPTS = [user_chat(q) for q in ("hi there", "a much longer question about many things ok", "x y", "tell me more")]


def test_mixed_batch_equals_separate_runs_token_for_token(tiny):
    """none / +c / -c in one batch give exactly the answers of three separate runs (greedy, fp32)."""
    model, tok = tiny
    v = torch.randn(64) * 4
    up, down = Steering({2: v}), Steering({2: -v})
    kwargs = dict(max_new_tokens=12, show_progress=False, batch_size=64)
    plain = generate(model, tok, PROMPTS, **kwargs)
    with add_vectors(model, {2: v}):
        amplified = generate(model, tok, PROMPTS, **kwargs)
    with add_vectors(model, {2: -v}):
        suppressed = generate(model, tok, PROMPTS, **kwargs)
    mixed = generate(model, tok, PROMPTS * 3, steerings=[None] * 4 + [up] * 4 + [down] * 4, **kwargs)
    assert mixed == plain + amplified + suppressed
    assert amplified != plain and suppressed != plain  # the steering is strong enough to matter


def test_mixed_batch_in_small_batches_and_shuffled_order(tiny_llama):
    """Rows of one steering spread over several batches, interleaved: still each its own answer."""
    model, tok = tiny_llama
    v = torch.randn(64) * 4
    steer_of = [None, Steering({1: v}), Steering({1: -v}), Steering({1: v})]
    expected = []
    for chat, steering in zip(PROMPTS, steer_of):
        if steering is None:
            expected += generate(model, tok, [chat], max_new_tokens=8, show_progress=False)
        else:
            with add_vectors(model, steering.deltas):
                expected += generate(model, tok, [chat], max_new_tokens=8, show_progress=False)
    # batch_size 1 keeps padding out of the comparison; batch_size 3 mixes slots within one batch
    assert generate(model, tok, PROMPTS, steerings=steer_of, max_new_tokens=8, show_progress=False,
                    batch_size=1) == expected


def test_row_slots_add_each_rows_own_delta_to_hidden_states(tiny):
    """A plain forward with slots [0, 1, 2]: row r's hidden_states[L] moves by exactly table[slot r]."""
    model, tok = tiny
    encoded = [encode_chat(tok, c).input_ids for c in CHATS]
    width = max(len(e) for e in encoded)
    ids = torch.tensor([e + [tok.pad_token_id] * (width - len(e)) for e in encoded])
    mask = torch.tensor([[1] * len(e) + [0] * (width - len(e)) for e in encoded])
    a, b = torch.randn(64), torch.randn(64)
    with torch.no_grad():
        base = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        handle = row_steering(model, [Steering({2: a}, "prompt"), Steering({2: b}, "prompt")])
        handle.set_rows(torch.tensor([0, 1, 2]))
        steered = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
        handle.remove()
        after = model(ids, attention_mask=mask, output_hidden_states=True).hidden_states[2]
    real = mask.bool()
    torch.testing.assert_close(steered[0], base[0])
    for row, delta in ((1, a), (2, b)):
        torch.testing.assert_close(steered[row][real[row]], base[row][real[row]] + delta, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(steered[row][~real[row]], base[row][~real[row]])  # padding is never steered
    torch.testing.assert_close(after, base)  # removed


def test_mixed_position_modes_in_one_batch_match_separate_runs(tiny_llama):
    model, tok = tiny_llama
    v = torch.randn(64) * 20
    modes = ["prompt", "response", "all", None]
    expected = []
    for chat, mode in zip(PROMPTS, modes):
        if mode is None:
            expected += generate(model, tok, [chat], max_new_tokens=6, show_progress=False)
        else:
            with add_vectors(model, {2: v}, positions=mode):
                expected += generate(model, tok, [chat], max_new_tokens=6, show_progress=False)
    steerings = [Steering({2: v}, m) if m else None for m in modes]
    assert generate(model, tok, PROMPTS, steerings=steerings, max_new_tokens=6, show_progress=False,
                    batch_size=1) == expected
    assert len(set(expected)) > 1


def test_backend_capture_equals_library_capture_and_facts(tiny_llama):
    from personavec.activations import capture
    from personavec.models import model_fingerprint

    model, tok = tiny_llama
    backend = as_backend(model, tok)
    assert isinstance(backend, HFBackend) and as_backend(backend) is backend
    assert (backend.n_layers, backend.hidden_size, backend.context_length) == (3, 64, 512)
    assert backend.fingerprint() == model_fingerprint(model)
    direct = backend.capture(CHATS, layers=[0, 3], show_progress=False)
    library = capture(model, tok, CHATS, layers=[0, 3], show_progress=False)
    torch.testing.assert_close(direct.response_avg, library.response_avg)
    assert backend.transformers_model() is model


def test_backend_errors_are_one_line(tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(PersonavecError, match="engine='tpu': use hf or vllm"):
        load_backend("whatever", engine="tpu")
    with pytest.raises(PersonavecError, match="tensor_parallel_size= needs engine=vllm"):
        load_backend("whatever", tensor_parallel_size=2)
    with pytest.raises(PersonavecError, match="expected a transformers model or a personavec backend"):
        as_backend("a string")
    with pytest.raises(PersonavecError, match="out of range"):
        generate(model, tok, PROMPTS[:1], steerings=[Steering({9: torch.zeros(64)})], show_progress=False)
    with pytest.raises(ValueError, match="one entry per chat"):
        generate(model, tok, PROMPTS, steerings=[None], show_progress=False)


# -- package shape ----------------------------------------------------------------------

PACKAGE = Path(__file__).resolve().parents[1] / "personavec"


def _module_name(path: Path, package: Path = PACKAGE) -> str:
    parts = list(path.relative_to(package.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, package: Path = PACKAGE) -> set[str]:
    """Every personavec module this file imports, at module level or inside functions."""
    name = _module_name(path, package)
    here = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = here.split(".")
                base = base[: len(base) - node.level + 1]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            candidates = [target] + [f"{target}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Import):
            candidates = [alias.name for alias in node.names]
        else:
            continue
        found |= {c for c in candidates if c.startswith("personavec") and _exists(c, package)}
    found.discard(name)
    return found


def _exists(module: str, package: Path = PACKAGE) -> bool:
    path = package.parent.joinpath(*module.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def import_cycle(package: Path) -> list[str] | None:
    """The first cycle in the graph of personavec imports (module-level and lazy ones alike), or None."""
    graph = {_module_name(p, package): _imports(p, package) for p in package.rglob("*.py")}
    on_stack, done = [], set()

    def visit(node):
        on_stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if nxt in on_stack:
                return on_stack[on_stack.index(nxt):] + [nxt]
            if nxt not in done:
                found = visit(nxt)
                if found:
                    return found
        on_stack.pop()
        done.add(node)
        return None

    for module in sorted(graph):
        if module not in done:
            found = visit(module)
            if found:
                return found
    return None


def test_no_import_cycle_in_the_package():
    """Data flows one way: no module imports (even lazily, inside a function) one that imports it back."""
    cycle = import_cycle(PACKAGE)
    assert cycle is None, f"import cycle: {' -> '.join(cycle)}"


def test_the_cycle_finder_finds_a_lazy_cycle(tmp_path):
    root = tmp_path / "personavec"
    (root / "sub").mkdir(parents=True)
    (root / "__init__.py").write_text("")
    (root / "sub" / "__init__.py").write_text("")
    (root / "a.py").write_text("from .sub import b\n")
    (root / "sub" / "b.py").write_text("def f():\n    from ..a import g\n")
    assert import_cycle(root) == ["personavec.a", "personavec.sub.b", "personavec.a"]
    (root / "sub" / "b.py").write_text("def f():\n    return 1\n")
    assert import_cycle(root) is None


def test_engine_checks_live_only_in_backends():
    offenders = [str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")
                 if "is_engine" in p.read_text() or "personavec_engine" in p.read_text()]
    assert offenders == []


def test_compiled_slot_pool_shares_reuses_and_refuses_when_full():
    """The vLLM compiled mode's host-side slot table (pure Python: runs without vLLM)."""
    from personavec.backends.base import Steering
    from personavec.backends.vllm_compiled import SlotPool

    written = []
    pool = SlotPool(lambda slot, deltas: written.append((slot, sorted(deltas))), n_slots=2)
    a, b, c = (Steering({3: torch.full((4,), float(x))}) for x in (1, 2, 3))
    assert pool.take([None]) == [0] and not written  # unsteered requests hold nothing
    first = pool.take([a])
    assert pool.take([a]) == first and len(written) == 1  # the same steering shares its slot
    second = pool.take([b])
    assert pool.take([c]) is None and pool.waits == 1  # full: the caller must wait
    pool.give(first)
    assert pool.take([c]) is None  # a still holds its slot (one user left)
    pool.give(first)
    assert pool.take([c]) == first and written[-1] == (first[0], [3])  # reused, and rewritten whole
    assert pool.take([None], reserve=1) is None  # a guard's reserved slot counts too
    pool.give(second)
    pool.give(first)
    assert pool.used == 0 and pool.fits_at_all([a, b]) and not pool.fits_at_all([a, b, c])
