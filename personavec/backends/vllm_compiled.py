"""The vLLM engine's compiled mode: steering, readings and capture as operations of the model itself.

Eager mode (`vllm.py`'s hooks) needs `enforce_eager=True`, because compiled graphs skip Python hooks. Here the
decoder layers are changed at load, before vLLM traces and compiles the model, so that what they add and read is
part of the graph and works on persistent buffers the runner fills in place between steps:

- steering: block L's output gets `table_L[slot[token]]`; `table_L` is `[n_slots + 1, hidden]` (row 0 is zero)
  and `slot` a `[max_num_batched_tokens]` int buffer. The position modes (all / prompt / response) are only a
  choice of slot per token (0 where a request is not steered);
- readings (the server): `proj_L[token] = stream @ units_L.T` along at most `read_units` fixed unit vectors per
  layer, caps clamp those projections on decode tokens (a per-token limit, 1e30 = none). Only the projections
  leave the graph;
- capture (`capture()`): per request, the sums of the stream over prompt tokens and over response tokens, their
  norms and the last prompt token, added inside the graph into `[2 * capture_rows + 1, hidden]` accumulators
  (row 0 takes the tokens no one captures). Only these sums leave the graph, never per-token hidden states.

Only the layers named at load get the ops (`steer_layers`, `read_layers`, `capture_layers`); the host decides which
request gets which slot (`SlotPool`), so a request whose steering finds no free slot waits for one.

The wrap runs inside vLLM's model loader (load format `personavec`, registered here and in every worker, which
imports this module with the worker extension), configured by `additional_config["personavec"]`.
"""

from __future__ import annotations

import copy
import hashlib
import sys
from pathlib import Path

import numpy as np
import torch

from ..models.layout import decoder_blocks, final_norm

LOAD_FORMAT = "personavec"
CONFIG_KEY = "personavec"
NO_CAP = 1e30
CODE_HASH = hashlib.sha1(Path(__file__).read_bytes()).hexdigest()[:12]  # part of vLLM's compile-cache key


def register_loader() -> None:
    """vLLM's default loader, then the wrap; the same weights formats (`load_format` resolves as `auto`)."""
    from vllm.model_executor.model_loader import _LOAD_FORMAT_TO_MODEL_LOADER, register_model_loader
    from vllm.model_executor.model_loader.default_loader import DefaultModelLoader

    if LOAD_FORMAT in _LOAD_FORMAT_TO_MODEL_LOADER:
        return

    class PersonavecLoader(DefaultModelLoader):
        def __init__(self, load_config):
            load_config = copy.copy(load_config)
            load_config.load_format = "auto"
            super().__init__(load_config)

        def load_model(self, vllm_config, model_config, prefix=""):
            model = super().load_model(vllm_config, model_config, prefix=prefix)
            cfg = (vllm_config.additional_config or {}).get(CONFIG_KEY)
            if cfg:
                wrap_model(model, cfg, vllm_config)
            return model

    register_model_loader(LOAD_FORMAT)(PersonavecLoader)


class CompiledState:
    """The buffers of one wrapped model, as the worker extension fills and reads them."""

    def __init__(self, cfg: dict, n_layers: int, hidden: int, tokens: int, device, dtype):
        self.cfg, self.n_layers, self.hidden, self.tokens = cfg, n_layers, hidden, tokens
        self.device, self.dtype = device, dtype
        self.n_slots = int(cfg["slots"]) + 1
        self.k = int(cfg["read_units"])
        self.c = int(cfg["capture_rows"])
        self.steer_layers = sorted(int(x) for x in cfg["steer_layers"])
        self.read_layers = sorted(int(x) for x in cfg["read_layers"])
        self.capture_layers = sorted(int(x) for x in cfg["capture_layers"])
        long = dict(dtype=torch.long, device=device)
        f32 = dict(dtype=torch.float32, device=device)
        self.slot = torch.zeros(tokens, **long)
        self.crow = torch.zeros(tokens, **long)
        self.clast = torch.zeros(tokens, **long)
        self.tables = {layer: torch.zeros(self.n_slots, hidden, dtype=dtype, device=device)
                       for layer in self.steer_layers}
        self.units = {layer: torch.zeros(self.k, hidden, **f32) for layer in self.read_layers}
        self.limits = {layer: torch.full((tokens, self.k), NO_CAP, **f32) for layer in self.read_layers}
        self.proj = {layer: torch.zeros(tokens, self.k, **f32) for layer in self.read_layers}
        self.acc = {layer: torch.zeros(2 * self.c + 1, hidden, **f32) for layer in self.capture_layers}
        self.norms = {layer: torch.zeros(2 * self.c + 1, **f32) for layer in self.capture_layers}
        self.last = {layer: torch.zeros(self.c + 1, hidden, **f32) for layer in self.capture_layers}
        # host staging for the per-token index buffers: filled with numpy, copied with one copy_ each
        self.host_slot = torch.zeros(tokens, dtype=torch.long, pin_memory=_pin())
        self.host_crow = torch.zeros(tokens, dtype=torch.long, pin_memory=_pin())
        self.host_clast = torch.zeros(tokens, dtype=torch.long, pin_memory=_pin())
        self.host_limits = torch.full((tokens, self.k), NO_CAP, dtype=torch.float32, pin_memory=_pin())
        self.filled = 0  # rows of slot that may be non-zero
        self.capture_filled = 0
        self.limits_filled = 0


def _pin() -> bool:
    return torch.cuda.is_available()


def _observe(mod, layer: int, hidden: torch.Tensor, residual, caps: bool) -> torch.Tensor:
    """Readings (and caps) then capture at `layer`, on the stream `hidden (+ residual)`; returns `hidden`, capped."""
    n = hidden.shape[0]
    stream = hidden.float() if residual is None else hidden.float() + residual.float()
    if layer in mod._pv_read:
        units = getattr(mod, f"pv_units_{layer}")
        proj = stream @ units.T
        if caps:
            excess = (proj - getattr(mod, f"pv_limits_{layer}")[:n]).clamp(min=0)
            change = excess @ units
            stream = stream - change
            hidden = hidden - change.to(hidden.dtype)
            proj = stream @ units.T
        getattr(mod, f"pv_proj_{layer}")[:n].copy_(proj)
    if layer in mod._pv_capture:
        rows, last = mod.pv_crow[:n], mod.pv_clast[:n]
        getattr(mod, f"pv_acc_{layer}").index_add_(0, rows, stream)
        getattr(mod, f"pv_norms_{layer}").index_add_(0, rows, stream.norm(dim=-1))
        getattr(mod, f"pv_last_{layer}").index_add_(0, last, stream)
    return hidden


def _register(mod, state: CompiledState, layers: list[int], steer: bool, read: bool, capture: bool) -> None:
    mod.register_buffer("pv_slot", state.slot, persistent=False)
    mod.register_buffer("pv_crow", state.crow, persistent=False)
    mod.register_buffer("pv_clast", state.clast, persistent=False)
    for layer in layers:
        if steer and layer in state.tables:
            mod.register_buffer(f"pv_table_{layer}", state.tables[layer], persistent=False)
            mod._pv_steer.add(layer)
        if read and layer in state.units:
            for name in ("units", "limits", "proj"):
                mod.register_buffer(f"pv_{name}_{layer}", getattr(state, name)[layer], persistent=False)
            mod._pv_read.add(layer)
        if capture and layer in state.acc:
            for name in ("acc", "norms", "last"):
                mod.register_buffer(f"pv_{name}_{layer}", getattr(state, name)[layer], persistent=False)
            mod._pv_capture.add(layer)


def _steer(mod, layer: int, hidden: torch.Tensor) -> torch.Tensor:
    if layer not in mod._pv_steer:
        return hidden
    return hidden + getattr(mod, f"pv_table_{layer}")[mod.pv_slot[: hidden.shape[0]]]


def wrap_model(model, cfg: dict, vllm_config) -> CompiledState:
    """Give the decoder blocks (and the final norm) the ops of `cfg`'s layers; keeps the state on the model."""
    blocks, norm = decoder_blocks(model), final_norm(model)
    n = len(blocks)
    param = next(model.parameters())
    hidden = vllm_config.model_config.get_hidden_size()
    tokens = int(vllm_config.scheduler_config.max_num_batched_tokens)
    state = CompiledState(cfg, n, hidden, tokens, param.device, param.dtype)
    last_on_norm = norm is not None
    for index, block in enumerate(blocks):
        layer = index + 1
        pre = [0] if layer == 1 else []
        observe = pre + ([] if (layer == n and last_on_norm) else [layer])  # the last layer is read after the norm
        block._pv_steer, block._pv_read, block._pv_capture = set(), set(), set()
        _register(block, state, pre + [layer], steer=True, read=False, capture=False)
        _register(block, state, [x for x in observe if x > 0], steer=False, read=True, capture=False)
        _register(block, state, observe, steer=False, read=False, capture=True)
        block._pv_pre, block._pv_layer, block._pv_post_observe = bool(pre), layer, layer in observe
        if not (block._pv_steer or block._pv_read or block._pv_capture):
            continue
        base = type(block)
        block.__class__ = type(f"Personavec{base.__name__}", (base,), {"forward": _block_forward(base.forward)})
    if last_on_norm:
        norm._pv_steer, norm._pv_read, norm._pv_capture = set(), set(), set()
        _register(norm, state, [n], steer=False, read=True, capture=True)
        if norm._pv_read or norm._pv_capture:
            base = type(norm)
            norm.__class__ = type(f"Personavec{base.__name__}", (base,), {"forward": _norm_forward(base.forward, n)})
    model._personavec_state = state
    return state


def _block_forward(original):
    def forward(self, positions, hidden_states, *args, **kwargs):
        if self._pv_pre:
            hidden_states = _observe(self, 0, hidden_states, None, caps=False)
            hidden_states = _steer(self, 0, hidden_states)
        out = original(self, positions, hidden_states, *args, **kwargs)
        hidden, residual = out if isinstance(out, tuple) else (out, None)
        layer = self._pv_layer
        hidden = _steer(self, layer, hidden)
        if self._pv_post_observe:
            hidden = _observe(self, layer, hidden, residual, caps=True)
        return (hidden, residual) if isinstance(out, tuple) else hidden
    return forward


def _norm_forward(original, layer: int):
    def forward(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        normed = out[0] if isinstance(out, tuple) else out
        _observe(self, layer, normed, None, caps=False)
        return out
    return forward


# -- the worker side: per-step fill and read-out ------------------------------------------------------------------

class RequestInfo:
    """What one request asked for, parsed once from its `extra_args`."""

    __slots__ = ("pslot", "rslot", "read", "caps", "guards", "guard_slot", "capture", "cap_prompt", "fired_pending")

    def __init__(self, mine: dict):
        slots = mine.get("slots") or (0, 0)
        self.pslot, self.rslot = int(slots[0]), int(slots[1])
        self.read = mine.get("read")
        self.caps = {int(c): float(x) for c, x in (mine.get("caps") or {}).items()}
        self.guards = mine.get("guards") or []
        self.guard_slot = int(mine.get("guard_slot") or 0)
        capture = mine.get("capture")
        self.capture = int(capture[0]) if capture else 0
        self.cap_prompt = int(capture[1]) if capture else 0
        self.fired_pending = False


class CompiledWorker:
    """Mixed into `vllm.WorkerExtension`: the compiled mode's side of every `personavec_*` call."""

    def _pvc_install(self, state: CompiledState) -> None:
        self._pvc = state
        self._pvc_infos: dict[str, RequestInfo | None] = {}
        self._pvc_units_k: dict[int, int] = {}  # read layer -> units set there
        self._pvc_offsets: dict[int, int] = {}
        self._pvc_reads: dict[str, dict] = {}
        self._pvc_guarded: list[RequestInfo] = []
        runner = self.model_runner
        original = runner._model_forward

        def model_forward(*args, **kwargs):
            step = self._pvc_before()
            out = original(*args, **kwargs)
            if step is not None:
                self._pvc_after(step)
            return out

        runner._model_forward = model_forward

    # -- control --------------------------------------------------------------------
    def personavec_write_slot(self, slot: int, deltas: dict, add_slots: list[int] | None = None) -> None:
        """Row `slot` of every steered layer: `deltas[layer]` (zero where not given), plus the rows `add_slots`."""
        state = self._pvc
        for layer, table in state.tables.items():
            row = torch.zeros(state.hidden, dtype=torch.float32)
            if layer in deltas or str(layer) in deltas:
                row += torch.tensor(deltas.get(layer, deltas.get(str(layer))), dtype=torch.float32)
            row = row.to(table.device, table.dtype)
            for other in add_slots or []:
                row = row + table[other]
            table[slot].copy_(row)

    def personavec_compiled_layers(self) -> dict:
        s = self._pvc
        return {"steer": s.steer_layers, "read": s.read_layers, "capture": s.capture_layers, "slots": s.n_slots - 1,
                "read_units": s.k, "capture_rows": s.c}

    def _pvc_set_units(self, units: dict) -> int:
        state = self._pvc
        self._pvc_units_k, self._pvc_offsets, column = {}, {}, 0
        for layer, table in state.units.items():
            table.zero_()
        for layer in sorted(int(x) for x in units):
            rows = torch.tensor(units[layer], dtype=torch.float32)
            state.units[layer][: rows.shape[0]].copy_(rows.to(state.device))
            self._pvc_units_k[layer] = rows.shape[0]
            self._pvc_offsets[layer] = column
            column += rows.shape[0]
        return column

    def _pvc_take_readings(self, keys: list[str]) -> dict:
        out = {}
        layers = sorted(self._pvc_units_k)

        def row(parts):
            return np.concatenate([parts[layer] for layer in layers]).astype(np.float32).tobytes() if all(
                layer in parts for layer in layers) else None

        for key in keys:
            state = self._pvc_reads.pop(key, None)
            if state is None:
                continue
            out[key] = {"prompt": row(state["prompt"]),
                        "tokens": {int(pos): row(parts) for pos, parts in sorted(state["tokens"].items())},
                        "fired": state["fired"]}
        return out

    def personavec_take_capture_rows(self, rows: list[int]) -> dict:
        """The capture sums of rows `rows` at every capture layer (then zeroed): layer -> bytes of
        prompt sums [R, hidden], response sums, last tokens, prompt norm sums [R], response norm sums."""
        state, out = self._pvc, {}
        index = torch.tensor(rows, dtype=torch.long, device=state.device)
        for layer in state.capture_layers:
            acc, norms, last = state.acc[layer], state.norms[layer], state.last[layer]
            out[layer] = {"prompt": acc[2 * index - 1].cpu().numpy().tobytes(),
                          "response": acc[2 * index].cpu().numpy().tobytes(),
                          "last": last[index].cpu().numpy().tobytes(),
                          "norm_prompt": norms[2 * index - 1].cpu().numpy().tobytes(),
                          "norm_response": norms[2 * index].cpu().numpy().tobytes()}
            acc.zero_()
            norms.zero_()
            last.zero_()
        return out

    # -- per step -------------------------------------------------------------------
    def _pvc_info(self, req_id: str) -> RequestInfo | None:
        state = self.model_runner.requests.get(req_id)
        params = state.sampling_params if state is not None else None
        mine = ((params.extra_args or {}) if params is not None else {}).get("personavec")
        info = RequestInfo(mine) if mine else None
        if info is not None and info.read and info.read not in self._pvc_reads:
            self._pvc_reads[info.read] = {"prompt": {}, "tokens": {}, "fired": []}
        return info

    def _pvc_before(self):
        """Fill slot (and capture rows, caps) for this step's tokens; None when no request asked for anything."""
        state, runner = self._pvc, self.model_runner
        if self._pvc_guarded:
            self._pvc_fire_guards()
        batch = runner.input_batch
        n = batch.num_reqs
        infos = self._pvc_infos
        if len(infos) > 2 * len(runner.requests) + 256:  # forget finished requests
            self._pvc_infos = infos = {k: v for k, v in infos.items() if k in runner.requests}
        chosen, which = [], []
        for i, req_id in enumerate(batch.req_ids[:n]):
            info = infos.get(req_id, False)
            if info is False:
                info = infos[req_id] = self._pvc_info(req_id)
            if info is not None:
                chosen.append(i)
                which.append(info)
        starts = runner.query_start_loc.np
        total = int(starts[n])
        if not chosen:
            self._pvc_clear(0)
            return None
        idx = np.asarray(chosen)
        a, b = starts[idx].astype(np.int64), starts[idx + 1].astype(np.int64)
        counts = b - a
        m = int(counts.sum())
        offsets = np.arange(m) - np.repeat(np.cumsum(counts) - counts, counts)
        rows = np.repeat(a, counts) + offsets
        pos = np.repeat(batch.num_computed_tokens_cpu[idx].astype(np.int64), counts) + offsets
        owner = np.repeat(np.arange(len(which)), counts)
        prompt_tokens = np.repeat(batch.num_prompt_tokens[idx].astype(np.int64), counts)
        is_prompt = pos < prompt_tokens
        reach = max(total, state.filled)
        pslot = np.fromiter((w.pslot for w in which), np.int64, len(which))
        rslot = np.fromiter((w.rslot for w in which), np.int64, len(which))
        if pslot.any() or rslot.any() or state.filled:
            host = state.host_slot.numpy()
            host[:reach] = 0
            host[rows] = np.where(is_prompt, pslot[owner], rslot[owner])
            state.slot[:reach].copy_(state.host_slot[:reach], non_blocking=True)
            state.filled = total if (pslot.any() or rslot.any()) else 0
        crow = np.fromiter((w.capture for w in which), np.int64, len(which))
        if (crow.any() or state.capture_filled) and state.capture_layers:
            reach_c = max(total, state.capture_filled)
            hc, hl = state.host_crow.numpy(), state.host_clast.numpy()
            hc[:reach_c] = 0
            hl[:reach_c] = 0
            cap_prompt = np.fromiter((w.cap_prompt for w in which), np.int64, len(which))[owner]
            c = crow[owner]
            hc[rows] = np.where(c == 0, 0, np.where(pos < cap_prompt, 2 * c - 1, np.where(is_prompt, 2 * c, 0)))
            hl[rows] = np.where(pos == cap_prompt - 1, c, 0)
            state.crow[:reach_c].copy_(state.host_crow[:reach_c], non_blocking=True)
            state.clast[:reach_c].copy_(state.host_clast[:reach_c], non_blocking=True)
            state.capture_filled = total if crow.any() else 0
        capped = [j for j, w in enumerate(which) if w.caps]
        if (capped or state.limits_filled) and self._pvc_units_k:
            self._pvc_fill_limits(which, capped, a, b, batch, idx, total)
        reading = [j for j, w in enumerate(which) if w.read]
        if not reading:
            return None
        return {"which": which, "reading": reading, "a": a, "b": b, "total": total,
                "start": batch.num_computed_tokens_cpu[idx].astype(np.int64),
                "prompt_tokens": batch.num_prompt_tokens[idx].astype(np.int64)}

    def _pvc_clear(self, total: int) -> None:
        state = self._pvc
        if state.filled:
            state.slot[: state.filled].zero_()
            state.filled = 0
        if state.capture_filled:
            state.crow[: state.capture_filled].zero_()
            state.clast[: state.capture_filled].zero_()
            state.capture_filled = 0
        if state.limits_filled:
            for limits in state.limits.values():
                limits[: state.limits_filled].fill_(NO_CAP)
            state.limits_filled = 0

    def _pvc_fill_limits(self, which, capped, a, b, batch, idx, total) -> None:
        state = self._pvc
        reach = max(total, state.limits_filled)
        for layer, limits in state.limits.items():
            host = state.host_limits.numpy()
            host[:reach] = NO_CAP
            k_here = self._pvc_units_k.get(layer, 0)
            offset = self._pvc_offsets.get(layer, 0)
            for j in capped:
                w = which[j]
                start = int(batch.num_computed_tokens_cpu[idx[j]])
                prompt = int(batch.num_prompt_tokens[idx[j]])
                lo = int(a[j]) + max(0, prompt - start)  # decode rows only
                for k in range(k_here):
                    if offset + k in w.caps:
                        host[lo:int(b[j]), k] = w.caps[offset + k]
            limits[:reach].copy_(state.host_limits[:reach])  # the staging row is reused per layer
        state.limits_filled = total if capped else 0

    def _pvc_after(self, step) -> None:
        """Read the projections of this step's reading requests (only those numbers come to the host)."""
        state = self._pvc
        total = step["total"]
        proj = {layer: state.proj[layer][:total, :k].cpu().numpy() for layer, k in self._pvc_units_k.items()}
        for j in step["reading"]:
            w = step["which"][j]
            reads = self._pvc_reads.get(w.read)
            if reads is None:
                continue
            a, b = int(step["a"][j]), int(step["b"][j])
            start, prompt = int(step["start"][j]), int(step["prompt_tokens"][j])
            for row in range(a, b):
                pos = start + row - a
                if pos == prompt - 1:
                    for layer, values in proj.items():
                        reads["prompt"][layer] = values[row].copy()
                    fired = [g["index"] for g in w.guards
                             if float(self._pvc_column(proj, g["column"], row)) > g["threshold"]]
                    if fired and not reads["fired"]:
                        reads["fired"] = fired
                        w.fired_pending = True
                        self._pvc_guarded.append(w)
                elif pos >= prompt:
                    slot = reads["tokens"].setdefault(pos, {})
                    for layer, values in proj.items():
                        slot[layer] = values[row].copy()

    def _pvc_column(self, proj, column: int, row: int) -> float:
        for layer, offset in self._pvc_offsets.items():
            if offset <= column < offset + self._pvc_units_k[layer]:
                return proj[layer][row, column - offset]
        return float("-inf")

    def _pvc_fire_guards(self) -> None:
        """Between steps: a request whose guards fired steers its response with its own steering plus theirs,
        in the slot reserved for it."""
        for w in self._pvc_guarded:
            if not w.fired_pending or not w.guard_slot:
                continue
            fired = set(self._pvc_reads.get(w.read, {}).get("fired") or [])
            add = [int(g["slot"]) for g in w.guards if g["index"] in fired] + ([w.rslot] if w.rslot else [])
            self.personavec_write_slot(w.guard_slot, {}, add)
            w.rslot, w.fired_pending = w.guard_slot, False
        self._pvc_guarded = []


# -- the host side: who holds which slot --------------------------------------------------------------------------

class SlotPool:
    """Table slots of the compiled mode, shared by every request of one engine; a steering (by `Steering.key()`)
    holds one slot while any live request uses it. `take` returns None when the slots a request needs are not
    free: the caller makes it wait (never runs it unsteered)."""

    def __init__(self, write, n_slots: int):
        self.write, self.limit = write, n_slots
        self.by_key: dict[tuple, list] = {}  # key -> [slot, users]
        self.key_of: dict[int, tuple | None] = {}  # slot in use -> key (None: a reserved guard slot)
        self.waits = 0  # times a request found no free slot (tests and the benchmark read it)

    @property
    def used(self) -> int:
        return len(self.key_of)

    def _free_slot(self) -> int:
        return next(s for s in range(1, self.limit + 1) if s not in self.key_of)

    def take(self, steerings: list, reserve: int = 0) -> list[int] | None:
        """One slot per steering (0 for None; shared with any live request of the same steering) and `reserve`
        fresh slots; None (nothing taken) when they do not fit."""
        keys = [None if s is None or not s.deltas else s.key() for s in steerings]
        new = {k for k in keys if k is not None and k not in self.by_key}
        if len(new) + reserve + self.used > self.limit:
            self.waits += 1
            return None
        out = []
        for steering, key in zip(steerings, keys):
            if key is None:
                out.append(0)
                continue
            entry = self.by_key.get(key)
            if entry is None:
                slot = self._free_slot()
                self.write(slot, {int(layer): d.float().tolist() for layer, d in steering.deltas.items()})
                entry = self.by_key[key] = [slot, 0]
                self.key_of[slot] = key
            entry[1] += 1
            out.append(entry[0])
        for _ in range(reserve):
            slot = self._free_slot()
            self.key_of[slot] = None
            out.append(slot)
        return out

    def fits_at_all(self, steerings: list, reserve: int = 0) -> bool:
        keys = {s.key() for s in steerings if s is not None and s.deltas}
        return len(keys) + reserve <= self.limit

    def give(self, slots: list[int]) -> None:
        for slot in slots:
            if not slot or slot not in self.key_of:
                continue
            key = self.key_of[slot]
            if key is None:
                del self.key_of[slot]
                continue
            entry = self.by_key[key]
            entry[1] -= 1
            if entry[1] == 0:
                del self.by_key[key]
                del self.key_of[slot]


if "vllm" in sys.modules:  # inside a vLLM worker (which imports this with the worker extension): before loading
    try:
        register_loader()
    except ImportError:
        pass
