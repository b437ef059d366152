"""The transformers backend: batched generation with per-row steering, capture, and removable hooks.

Steering hooks add `table[row_slot]` to a block's output: every batch row has its own slot and slot 0 is
zero, so one batch can hold unsteered rows and rows steered each their own way. `steer()` is the one-slot
case (every row gets slot 1). Handles compose: two active handles both add.

Positions during cached generation: `all` steers every token of every pass; `prompt` only the prefill
(generated tokens are not steered, but attend to the steered prompt); `response` only decode steps (a pass
that extends a non-empty KV cache). In a plain forward without a cache (training, scoring a full chat), a
pass counts as prompt unless a `token_mask` [batch, seq] (1 = response token) is set with
`handle.set_token_mask`, which splits it. Padding positions (attention mask 0) are never steered.

Capture calls the decoder stack, never the LM head, stops after the deepest layer asked for, and batches
chats by length with right padding, so no padding token shifts the positions of real ones.
"""

from __future__ import annotations

import torch

from dataclasses import dataclass, field

from ..chat import EncodedChat, prompt_text
from ..models import decoder_blocks, decoder_stack, final_norm, hidden_size, model_fingerprint, n_layers, unwrap
from ..progress import progress_bar
from .base import (POSITIONS, Activations, Backend, Steering, check_layers, check_positions, check_steering,
                   distinct_steerings, encode_for_capture)

__all__ = ["AblationHandle", "HFBackend", "MonitoredAnswer", "SteeringHandle", "row_steering"]


class SteeringHandle:
    """Live hooks that add `tables[L][row_slot]` at each layer L; `remove()` (or leaving `with`) takes them off.

    Built from `{layer: delta}` it is a one-slot table that every row uses. `set_rows(slots)` gives each row of
    the next passes its own slot (0 = nothing), with `slot_positions[s]` saying where slot s steers."""

    def __init__(self, model, deltas: dict[int, torch.Tensor], positions: str = "all", *,
                 tables: dict[int, torch.Tensor] | None = None, slot_positions: list[str] | None = None):
        if tables is None:
            check_steering(n_layers(model), deltas, positions)
            tables = {layer: torch.stack([torch.zeros_like(d.detach().float()), d.detach().float()])
                      for layer, d in deltas.items()}
            slot_positions = ["all", positions]
        self.positions = positions
        self.tables = tables
        # slot 1: the single-steering case (a row table made for load_slots may have no slot yet)
        self.deltas = {layer: table[1] for layer, table in tables.items() if table.shape[0] > 1}
        self.slot_positions = slot_positions
        self.row_slots: torch.Tensor | None = None  # None: every row uses slot 1
        self._row_modes: list[tuple[str, torch.Tensor | None]] = []
        self.token_mask: torch.Tensor | None = None
        self._attention: torch.Tensor | None = None
        self._decoding = False
        self._cast: dict[tuple, torch.Tensor] = {}
        self._handles = []
        try:
            blocks = decoder_blocks(model)
            self._handles.append(decoder_stack(model).register_forward_pre_hook(self._see_inputs, with_kwargs=True))
            for layer in self.tables:
                if layer == 0:
                    self._handles.append(blocks[0].register_forward_pre_hook(self._pre_hook, with_kwargs=True, prepend=True))
                else:
                    # prepend: transformers records hidden_states with its own forward hooks, which must see our change
                    self._handles.append(blocks[layer - 1].register_forward_hook(self._post_hook(layer), prepend=True))
        except BaseException:
            self.remove()
            raise

    # -- hooks -------------------------------------------------------------
    def _see_inputs(self, module, args, kwargs):
        self._attention = kwargs.get("attention_mask")
        cache = kwargs.get("past_key_values")
        self._decoding = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0

    def _table(self, layer: int, like: torch.Tensor) -> torch.Tensor:
        key = (layer, like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = self.tables[layer].to(device=like.device, dtype=like.dtype)
        return self._cast[key]

    def _weights(self, hidden: torch.Tensor, positions: str) -> torch.Tensor | None:
        """Per-token 0/1 weights [batch, seq, 1] for one position mode, or None for 'every token'."""
        seq = hidden.shape[1]
        if positions == "all" or (positions == "response" and self._decoding):
            weights = None
        elif positions == "prompt" and self._decoding:
            return torch.zeros(hidden.shape[:2] + (1,), dtype=hidden.dtype, device=hidden.device)
        elif self.token_mask is not None:
            mask = self.token_mask.to(hidden.device, hidden.dtype)[:, -seq:]
            weights = (mask if positions == "response" else 1 - mask).unsqueeze(-1)
        else:  # a plain pass with no token mask counts as prompt
            weights = None if positions == "prompt" else torch.zeros(hidden.shape[:2] + (1,), dtype=hidden.dtype, device=hidden.device)
        attention = self._attention
        # Decode steps add real tokens only (padding is on the left), so only full passes need the padding check.
        if self._decoding or not isinstance(attention, torch.Tensor):
            return weights
        if attention.dim() == 2 and attention.shape[1] >= seq and not bool(attention[:, -seq:].all()):
            pad = attention[:, -seq:].to(hidden.dtype).unsqueeze(-1)
            weights = pad if weights is None else weights * pad
        return weights

    def _steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        table = self._table(layer, hidden)
        if self.row_slots is None:  # one steering for every row: the cheap broadcast add
            weights = self._weights(hidden, self.positions)
            return hidden + table[1] if weights is None else hidden + weights * table[1]
        per_row = table[self.row_slots.to(hidden.device)].unsqueeze(1)  # [batch, 1, hidden]; slot 0 adds exactly 0
        out = hidden
        for mode, in_mode in self._row_modes:
            weights = self._weights(hidden, mode)
            if in_mode is not None:  # rows of several position modes in one batch
                in_mode = in_mode.to(hidden.device, hidden.dtype)
                weights = in_mode if weights is None else weights * in_mode
            out = out + per_row if weights is None else out + weights * per_row
        return out

    def _post_hook(self, layer: int):
        def hook(module, args, output):
            if isinstance(output, tuple):
                return (self._steer(layer, output[0]),) + tuple(output[1:])
            return self._steer(layer, output)
        return hook

    def _pre_hook(self, module, args, kwargs):
        if args:
            return (self._steer(0, args[0]),) + tuple(args[1:]), kwargs
        return args, {**kwargs, "hidden_states": self._steer(0, kwargs["hidden_states"])}

    # -- lifecycle ---------------------------------------------------------
    def set_token_mask(self, mask: torch.Tensor | None) -> None:
        self.token_mask = mask

    def load_slots(self, steerings: list[Steering], slots: list[int]) -> None:
        """Replace the table with `steerings` (slot s + 1 = steerings[s]) and give rows `slots`, between passes.
        Only layers hooked at creation can be steered."""
        width = next(iter(self.tables.values())).shape[1]
        tables = {}
        for layer in self.tables:
            table = torch.zeros(len(steerings) + 1, width)
            for slot, steering in enumerate(steerings, start=1):
                if layer in steering.deltas:
                    table[slot] = steering.deltas[layer].detach().float()
            tables[layer] = table
        unknown = {layer for s in steerings for layer in s.deltas} - set(self.tables)
        if unknown:
            raise ValueError(f"layers {sorted(unknown)} were not hooked when the handle was made")
        self.tables, self._cast = tables, {}
        self.slot_positions = ["all"] + [s.positions for s in steerings]
        self.set_rows(torch.tensor(slots))

    def set_rows(self, slots: torch.Tensor | None) -> None:
        """Slot per batch row for the following passes (0 = unsteered); None = every row slot 1."""
        self.row_slots = slots
        self._row_modes = []
        if slots is not None:  # decided once per batch, so the hooks never sync on the slot values
            modes = sorted({self.slot_positions[s] for s in slots.tolist() if s != 0}) or ["all"]
            for mode in modes:
                in_mode = None if len(modes) == 1 else torch.tensor(
                    [float(self.slot_positions[s] == mode) for s in slots.tolist()]).view(-1, 1, 1)
                self._row_modes.append((mode, in_mode))

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "SteeringHandle":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def row_steering(model, steerings: list[Steering], layers: list[int] | None = None) -> SteeringHandle:
    """A handle whose slot s + 1 adds `steerings[s]`; give rows their slots with `set_rows`. `layers` hooks
    more layers than the steerings use, for `load_slots` later."""
    total = n_layers(model)
    for steering in steerings:
        check_steering(total, steering.deltas, steering.positions)
    layers = sorted({layer for s in steerings for layer in s.deltas} | set(layers or []))
    width = hidden_size(model)
    tables = {}
    for layer in layers:
        table = torch.zeros(len(steerings) + 1, width)
        for slot, steering in enumerate(steerings, start=1):
            if layer in steering.deltas:
                table[slot] = steering.deltas[layer].detach().float()
        tables[layer] = table
    return SteeringHandle(model, {}, "all", tables=tables, slot_positions=["all"] + [s.positions for s in steerings])


class AblationHandle(SteeringHandle):
    """Live hooks that project a direction out of the residual stream: `h <- h - (h . u) u` for the unit `u` of each
    layer (CAFT, concept-ablation fine-tuning). Same positions, padding rule and lifecycle as steering."""

    def __init__(self, model, directions: dict[int, torch.Tensor], positions: str = "all"):
        units = {layer: d.float() / d.float().norm().clamp(min=1e-12) for layer, d in directions.items()}
        super().__init__(model, units, positions)

    def _steer(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        unit = self._table(layer, hidden)[1]
        weights = self._weights(hidden, self.positions)
        removed = (hidden @ unit).unsqueeze(-1) * unit
        return hidden - removed if weights is None else hidden - weights * removed


@dataclass
class MonitoredAnswer:
    """One row of `generate_monitored`: the answer and the readings taken from the forward passes that made it."""

    text: str
    token_ids: list[int]
    prompt_tokens: int
    prompt_readings: torch.Tensor  # [K]: last prompt token, projected on each unit
    token_readings: torch.Tensor  # [n_tokens, K]: the state each generated token was produced from
    fed_readings: torch.Tensor  # [n_fed, K]: states of the generated tokens fed back (the response span)
    finish_reason: str = "stop"
    actions: list = field(default_factory=list)


class _Monitor:
    """Forward hooks that cap and read the residual stream along fixed unit vectors, per row and token.

    `units[L]` is `[K_L, hidden]`; readings of every layer are concatenated in `layers` order (K columns).
    A cap for column k of row r clamps `h . u_k` to at most `caps[r, k]` on decode steps (inf = no cap)."""

    def __init__(self, model, units: dict[int, torch.Tensor]):
        self.layers = sorted(units)
        self.units = {layer: units[layer].float() for layer in self.layers}
        offsets, start = {}, 0
        for layer in self.layers:
            offsets[layer] = (start, start + self.units[layer].shape[0])
            start += self.units[layer].shape[0]
        self.offsets, self.width = offsets, start
        self.caps: torch.Tensor | None = None  # [batch, K]
        self.prompt: torch.Tensor | None = None  # [batch, K]
        self.steps: list[torch.Tensor] = []  # per decode step: [batch, K]
        self._parts: dict[int, torch.Tensor] = {}
        self._decoding = False
        self._cast: dict = {}
        blocks = decoder_blocks(model)
        norm, total = final_norm(model), len(blocks)
        self._handles = [decoder_stack(model).register_forward_pre_hook(self._see_inputs, with_kwargs=True)]
        for layer in self.layers:
            if layer == 0:
                raise ValueError("readings at layer 0 (the embeddings) are not supported while generating")
            # after steering's prepended hooks: readings see the steered (and capped) stream
            self._handles.append(blocks[layer - 1].register_forward_hook(self._hook(layer, norm if layer == total else None)))

    def _see_inputs(self, module, args, kwargs):
        cache = kwargs.get("past_key_values")
        self._decoding = cache is not None and hasattr(cache, "get_seq_length") and cache.get_seq_length() > 0

    def _unit(self, layer, like):
        key = (layer, like.dtype, like.device)
        if key not in self._cast:
            self._cast[key] = self.units[layer].to(like.device, like.dtype)
        return self._cast[key]

    def _hook(self, layer: int, norm):
        a, b = self.offsets[layer]

        def hook(module, args, output):
            hidden = output[0] if isinstance(output, tuple) else output
            units = self._unit(layer, hidden)
            if self._decoding and self.caps is not None:
                caps = self.caps[:, a:b]
                for k in range(b - a):
                    limit = caps[:, k].to(hidden.device, hidden.dtype).view(-1, 1)
                    if bool(torch.isinf(caps[:, k]).all()):
                        continue
                    excess = (hidden @ units[k] - limit).clamp(min=0)  # [batch, seq]
                    hidden = hidden - excess.unsqueeze(-1) * units[k]
            last = hidden[:, -1]
            read = norm(last) if norm is not None else last  # hidden_states[-1] is after the final norm
            self._parts[layer] = read.float() @ units.float().T
            if layer == self.layers[-1]:
                row = torch.cat([self._parts[la] for la in self.layers], dim=1).cpu()
                if self._decoding:
                    self.steps.append(row)
                else:
                    self.prompt = row
            if isinstance(output, tuple):
                return (hidden,) + tuple(output[1:])
            return hidden
        return hook

    def remove(self):
        for handle in self._handles:
            handle.remove()
        self._handles = []


class _StepCallback:
    """A logits processor: called after each forward pass, before the next token is chosen. It runs the
    guard decision after the prefill, streams each row's new token, and ends rows early by forcing EOS."""

    def __init__(self, prompt_width: int, eos_id: int, limits: list[int], on_prefill, on_step):
        self.prompt_width, self.eos_id, self.limits = prompt_width, eos_id, limits
        self.on_prefill, self.on_step = on_prefill, on_step
        self.calls = 0
        self.ended: list[str | None] = [None] * len(limits)

    def __call__(self, input_ids, scores):
        generated = input_ids.shape[1] - self.prompt_width
        if self.calls == 0 and self.on_prefill is not None:
            self.on_prefill()
        elif generated > 0 and self.on_step is not None:
            stops = self.on_step(input_ids[:, -1].tolist(), generated)
            for row, stop in enumerate(stops or []):
                if stop and self.ended[row] is None:
                    self.ended[row] = stop
        self.calls += 1
        for row, limit in enumerate(self.limits):
            if self.ended[row] is None and generated >= limit:
                self.ended[row] = "length"
            if self.ended[row] is not None:
                scores[row] = float("-inf")
                scores[row, self.eos_id] = 0.0
        return scores


class _StopForward(Exception):
    """Raised by the hook of the deepest requested layer: nothing later is needed."""


def _batches(lengths: list[int], batch_size: int, max_tokens: int | None):
    """Indices grouped by similar length (long first), so padding stays small."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    batch: list[int] = []
    for i in order:
        longest = lengths[batch[0]] if batch else lengths[i]
        if batch and (len(batch) >= batch_size or (max_tokens and longest * (len(batch) + 1) > max_tokens)):
            yield batch
            batch = []
        batch.append(i)
    if batch:
        yield batch


def _pad_right(encoded: list[EncodedChat], pad_id: int, device) -> dict[str, torch.Tensor]:
    width = max(len(e.input_ids) for e in encoded)
    ids = torch.full((len(encoded), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(encoded), width), dtype=torch.long)
    prompt = torch.zeros((len(encoded), width), dtype=torch.float32)
    response = torch.zeros((len(encoded), width), dtype=torch.float32)
    last = torch.zeros(len(encoded), dtype=torch.long)
    for row, e in enumerate(encoded):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        prompt[row, : e.prompt_len] = 1
        response[row, e.prompt_len : n] = 1
        last[row] = e.prompt_len - 1
    return {k: v.to(device) for k, v in
            dict(input_ids=ids, attention_mask=attention, prompt=prompt, response=response, last=last).items()}


class HFBackend(Backend):
    """A transformers causal LM (peft-wrapped models included) and its tokenizer."""

    engine = "hf"

    def __init__(self, model: torch.nn.Module, tokenizer=None):
        self.model = model
        self.tokenizer = tokenizer
        self.name_or_path = getattr(model, "name_or_path", "")

    # -- model facts ----------------------------------------------------------------
    @property
    def n_layers(self) -> int:
        return n_layers(self.model)

    @property
    def hidden_size(self) -> int:
        return hidden_size(self.model)

    @property
    def context_length(self) -> int | None:
        return getattr(unwrap(self.model).config, "max_position_embeddings", None)

    @property
    def config(self):
        return self.model.config

    def fingerprint(self) -> str:
        return model_fingerprint(self.model)

    def transformers_model(self, what: str = "this step") -> torch.nn.Module:
        return self.model

    def _device(self):
        return next(self.model.parameters()).device

    # -- steering -------------------------------------------------------------------
    def steer(self, deltas: dict[int, torch.Tensor], positions: str = "all") -> SteeringHandle:
        return SteeringHandle(self.model, deltas, positions)

    def ablate(self, directions: dict[int, torch.Tensor], positions: str = "all") -> AblationHandle:
        return AblationHandle(self.model, directions, positions)

    # -- generation -----------------------------------------------------------------
    @torch.no_grad()
    def generate(self, chats, steerings=None, *, max_new_tokens=128, temperature=0.0, top_p=1.0, batch_size=16,
                 seed=0, show_progress=True, on_batch=None) -> list[str]:
        """Chats are batched by prompt length (left padding); a batch mixes steerings row by row."""
        tokenizer = self.tokenizer
        if steerings is not None and len(steerings) != len(chats):
            raise ValueError("steerings needs one entry per chat")
        unique, slots = distinct_steerings(steerings or [None] * len(chats))
        texts = [prompt_text(tokenizer, messages) for messages in chats]
        lengths = [len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        answers: list[str | None] = [None] * len(texts)
        device = self._device()
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        if seed is not None:
            torch.manual_seed(seed)
        rows = row_steering(self.model, unique) if unique else None
        try:
            with progress_bar("generating", total=len(texts), enabled=show_progress) as advance:
                for start in range(0, len(order), batch_size):
                    indices = order[start : start + batch_size]
                    if rows is not None:
                        rows.set_rows(torch.tensor([slots[i] for i in indices]))
                    batch = tokenizer([texts[i] for i in indices], return_tensors="pt", padding=True,
                                      add_special_tokens=False)
                    batch = {k: v.to(device) for k, v in batch.items()}
                    output = self.model.generate(
                        **batch, max_new_tokens=max_new_tokens, pad_token_id=tokenizer.pad_token_id,
                        top_k=None, **({} if temperature > 0 else dict(temperature=None, top_p=None)), **sampling,
                    )
                    new_tokens = output[:, batch["input_ids"].shape[1]:]
                    decoded = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
                    for i, text in zip(indices, decoded):
                        answers[i] = text.strip()
                    if on_batch:
                        on_batch(indices, [answers[i] for i in indices])
                    advance(len(indices))
        finally:
            if rows is not None:
                rows.remove()
        return answers  # type: ignore[return-value]

    @torch.no_grad()
    def generate_monitored(self, chats, steerings=None, *, units: dict[int, torch.Tensor], max_new_tokens: list[int],
                           temperature: float = 0.0, top_p: float = 1.0, seed: int | None = 0, caps=None,
                           guard_layers: list[int] | None = None, on_prefill=None, on_step=None) -> list[MonitoredAnswer]:
        """One batch, each row with its own steering, token limit and caps, read along `units` as it goes.

        `on_prefill(prompt_readings [B, K])` may return `(steerings, slots)` for response-position steering
        decided before the first decode step (guards), on `guard_layers`. `on_step(new_token_ids, step)` streams
        tokens and may return, per row, a finish reason to end it. No extra forward pass is run for readings."""
        tokenizer, model = self.tokenizer, self.model
        unique, slots = distinct_steerings(steerings or [None] * len(chats))
        texts = [prompt_text(tokenizer, messages) for messages in chats]
        batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        batch = {k: v.to(self._device()) for k, v in batch.items()}
        width = batch["input_ids"].shape[1]
        handles = []
        monitor = None
        try:
            if unique:
                rows = row_steering(model, unique)
                rows.set_rows(torch.tensor(slots))
                handles.append(rows)
            guard = row_steering(model, [], layers=guard_layers) if guard_layers else None
            if guard is not None:
                guard.set_rows(torch.zeros(len(chats), dtype=torch.long))
                handles.append(guard)
            monitor = _Monitor(model, units)
            monitor.caps = caps

            def prefill():
                if on_prefill is None:
                    return
                decided = on_prefill(monitor.prompt)
                if decided and guard is not None:
                    guard.load_slots(*decided)

            eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else tokenizer.pad_token_id
            step = _StepCallback(width, eos, list(max_new_tokens), prefill, on_step)
            sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
            if seed is not None:
                torch.manual_seed(seed)
            from transformers import LogitsProcessorList

            output = model.generate(**batch, max_new_tokens=max(max_new_tokens), pad_token_id=tokenizer.pad_token_id,
                                    logits_processor=LogitsProcessorList([step]), top_k=None,
                                    **({} if temperature > 0 else dict(temperature=None, top_p=None)), **sampling)
        finally:
            for handle in handles:
                handle.remove()
            if monitor is not None:
                monitor.remove()
        new_tokens = output[:, width:].tolist()
        if monitor.prompt is None:  # nothing to read: no units
            monitor.prompt = torch.zeros(len(chats), monitor.width)
        steps = torch.stack(monitor.steps, 1) if monitor.steps else torch.zeros(len(chats), 0, monitor.width)
        answers = []
        stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        prompt_tokens = batch["attention_mask"].sum(1).tolist()
        for row, ids in enumerate(new_tokens):
            n = next((i for i, t in enumerate(ids) if t in stop_ids), len(ids))
            reason = step.ended[row] or ("stop" if n < len(ids) else "length")
            kept = ids[:n]
            # decode step j fed token j; the batch's last sampled token is never fed back
            fed = steps[row, : min(n, steps.shape[1])]
            produced = torch.cat([monitor.prompt[row : row + 1], steps[row, : max(0, n - 1)]], 0)[:n]
            answers.append(MonitoredAnswer(
                text=tokenizer.decode(kept, skip_special_tokens=True).strip(), token_ids=kept,
                prompt_tokens=int(prompt_tokens[row]), prompt_readings=monitor.prompt[row],
                token_readings=produced, fed_readings=fed, finish_reason=reason))
        return answers

    # -- reading --------------------------------------------------------------------
    @torch.no_grad()
    def capture(self, chats, layers=None, positions=POSITIONS, *, batch_size=16, max_batch_tokens=8192,
                max_length=None, show_progress=True) -> Activations:
        check_positions(positions)
        model, tokenizer = self.model, self.tokenizer
        layers = check_layers(self.n_layers, layers)
        with_response = "response_avg" in positions
        encoded, skipped = encode_for_capture(tokenizer, chats, positions, max_length or self.context_length)
        device = self._device()
        results = {p: torch.zeros(len(chats), len(layers), self.hidden_size) for p in positions}
        token_norm = torch.zeros(len(chats), len(layers))
        skipped_set = set(skipped)
        keep = [i for i in range(len(chats)) if i not in skipped_set]

        blocks = decoder_blocks(model)
        norm = final_norm(model)
        total = len(blocks)
        deepest = max(layers)
        state: dict = {}

        mean_positions = [p for p in ("response_avg", "prompt_avg") if p in results]

        def record(layer: int, h: torch.Tensor) -> None:
            if layer == total and norm is not None:
                h = norm(h)  # hidden_states[-1] in transformers is after the final norm
            column = layers.index(layer)
            rows = state["rows"]
            if mean_positions:  # all span means of the batch in one fp32 matmul
                means = torch.bmm(state["mean_weights"], h.float()).cpu()
                for k, position in enumerate(mean_positions):
                    results[position][rows, column] = means[:, k]
            if "prompt_last" in results:
                results["prompt_last"][rows, column] = h[torch.arange(h.shape[0]), state["last"]].float().cpu()
            # Norms only scale norm-relative coefficients, so the model's dtype is precise enough (0.3% in bf16)
            # and several times cheaper than an fp32 pass; the means above stay fp32.
            token_norms = torch.linalg.vector_norm(h, dim=-1).float()
            token_norm[rows, column] = (token_norms * state["norm_weights"]).sum(1).cpu()
            if layer == deepest:
                raise _StopForward

        def output_hook(layer):
            def hook(module, args, output):
                record(layer, output[0] if isinstance(output, tuple) else output)
            return hook

        def input_hook(module, args, kwargs):
            record(0, args[0] if args else kwargs["hidden_states"])

        handles = []
        try:
            for layer in layers:
                if layer == 0:
                    handles.append(blocks[0].register_forward_pre_hook(input_hook, with_kwargs=True))
                else:
                    handles.append(blocks[layer - 1].register_forward_hook(output_hook(layer)))
            stack = decoder_stack(model)
            lengths = [len(encoded[i].input_ids) for i in keep]
            with progress_bar("activations", total=len(keep), enabled=show_progress) as advance:
                for batch in _batches(lengths, batch_size, max_batch_tokens):
                    rows = [keep[j] for j in batch]
                    tensors = _pad_right([encoded[i] for i in rows], tokenizer.pad_token_id or 0, device)
                    spans = {"response_avg": tensors["response"], "prompt_avg": tensors["prompt"]}
                    weights = {k: m / m.sum(1, keepdim=True).clamp(min=1) for k, m in spans.items()}
                    state.update(
                        rows=torch.tensor(rows), last=tensors["last"],
                        mean_weights=torch.stack([weights[p] for p in mean_positions], 1) if mean_positions else None,
                        norm_weights=weights["response_avg" if with_response else "prompt_avg"],
                    )
                    try:
                        stack(input_ids=tensors["input_ids"], attention_mask=tensors["attention_mask"], use_cache=False)
                    except _StopForward:
                        pass
                    advance(len(rows))
        finally:
            for handle in handles:
                handle.remove()

        return Activations(layers=layers, token_norm=token_norm, skipped=skipped, **results)
