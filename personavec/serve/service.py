"""The model side of the persona server: traits, batching, steering, readings and guards per request.

Requests that arrive together (within `batch_window_s`, up to `max_batch`) run as one batch on the backend;
every row keeps its own steering, token limit, stop strings, caps and guard decisions, so nothing leaks from
one request into another. Readings come from the forward passes that generate the answer: the last prompt
token before the first answer token, and each generated token's state, projected on every served trait's
unit vector at that trait's layer.
"""

from __future__ import annotations

import math
import queue
import threading
import time
from dataclasses import dataclass, field

import torch

from ..backends.base import Steering
from ..errors import PersonavecError
from ..vecmath import unit
from ..vectors import PersonaVector
from .guards import Guard


@dataclass
class ServedTrait:
    name: str
    vector: PersonaVector
    layer: int
    column: int  # index into the reading columns

    def scaled(self, reading: float) -> float | None:
        """The 0..1 scale from the vector's recorded pos/neg statistics at its layer (None without them)."""
        return self.vector.scaled(reading, self.layer)


@dataclass
class Job:
    """One chat completion request, as the worker sees it."""

    messages: list[dict]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    steer: dict[str, float] = field(default_factory=dict)
    coef_mode: str | None = None
    monitor: list[str] | None = None
    tokens: bool = False
    guards: list[Guard] = field(default_factory=list)
    on_delta: object = None  # callable(text) from the worker thread, for streaming
    on_done: object = None  # callable(result dict | None, error | None)
    cancelled: threading.Event = field(default_factory=threading.Event)
    # filled by the worker
    token_ids: list[int] = field(default_factory=list)
    emitted: str = ""
    stop_hit: bool = False
    started: float = 0.0
    actions: list = field(default_factory=list)


def served_layers(vectors: list[PersonaVector]) -> dict:
    """The layers a service over `vectors` steers and reads (each trait's own), as `load_backend` takes them: a
    compiled vLLM graph then carries ops only there. It never captures."""
    layers = sorted({v.layer for v in vectors if v.layer is not None})
    return {"steer_layers": layers, "read_layers": layers, "capture_layers": []}


class PersonaService:
    """A backend plus the traits it serves, and one worker thread that runs batches."""

    def __init__(self, backend, vectors: list[PersonaVector], guards: list[Guard] = (), *, model_name: str = "",
                 max_batch: int = 32, batch_window_s: float = 0.01, max_queue: int = 256):
        if not hasattr(backend, "generate_monitored") and not hasattr(backend, "stepper"):
            raise PersonavecError(f"the {backend.engine!r} engine cannot serve; use --engine hf or vllm")
        self.backend = backend
        self.model_name = model_name or backend.name_or_path
        self.traits: dict[str, ServedTrait] = {}
        for vector in vectors:
            name = vector.trait or ""
            if not name:
                raise PersonavecError(f"{vector.label}: records no trait name; it cannot be served")
            if name in self.traits:
                raise PersonavecError(f"{vector.label}: trait {name!r} is given twice")
            vector.check_model(backend)
            if vector.layer is None:
                raise PersonavecError(f"{vector.label}: records no layer to read and steer at; set one "
                                      "(vector.layer = L, then save) or make the file with `personavec vector`")
            layer = vector.check_layer(None)
            if layer == 0:
                raise PersonavecError(f"{vector.label}: layer 0 (the embeddings) cannot be read while serving")
            self.traits[name] = ServedTrait(name, vector, layer, column=-1)
        # readings are laid out layer by layer; a trait's column is its place in that layout
        self.units: dict[int, torch.Tensor] = {}
        column = 0
        for layer in sorted({t.layer for t in self.traits.values()}):
            here = [t for t in self.traits.values() if t.layer == layer]
            self.units[layer] = torch.stack([unit(t.vector.vectors[layer]) for t in here])
            for t in here:
                t.column = column
                column += 1
        self.width = column
        self.guards = list(guards)
        self.check_guards(self.guards)
        self.max_batch, self.batch_window_s = max_batch, batch_window_s
        self._queue: queue.Queue[Job] = queue.Queue(maxsize=max_queue)
        self.cancelled = 0  # requests whose client went away before they finished
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # one batch at a time on the model
        # vLLM: continuous batching (requests join between engine steps); transformers: batches of arrivals
        self._stepper = backend.stepper(self.units) if hasattr(backend, "stepper") else None
        self._thread = threading.Thread(target=self._run if self._stepper is None else self._run_stepping,
                                        name="personavec-serve-worker", daemon=True)
        self._thread.start()

    # -- requests ------------------------------------------------------------------
    def check_guards(self, guards: list[Guard]) -> None:
        for guard in guards:
            if guard.trait not in self.traits:
                raise PersonavecError(f"guard {guard}: unknown trait {guard.trait!r}; served: "
                                      f"{', '.join(self.traits) or 'none'}")

    def check_traits(self, names, what: str) -> None:
        unknown = [n for n in names if n not in self.traits]
        if unknown:
            raise PersonavecError(f"{what}: unknown trait {unknown[0]!r}; served: {', '.join(self.traits) or 'none'}")

    @property
    def context_length(self) -> int | None:
        return self.backend.context_length

    def prompt_tokens(self, messages: list[dict]) -> int:
        from ..chat import prompt_text

        tokenizer = self.backend.tokenizer
        return len(tokenizer(prompt_text(tokenizer, messages), add_special_tokens=False)["input_ids"])

    def submit(self, job: Job) -> None:
        try:
            self._queue.put_nowait(job)
        except queue.Full:
            raise OverflowError("the request queue is full") from None

    @property
    def pending(self) -> int:
        return self._queue.qsize()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join(timeout=5)

    # -- the worker ----------------------------------------------------------------
    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                first = self._queue.get(timeout=0.1)
            except queue.Empty:
                continue
            jobs = [first]
            deadline = time.monotonic() + self.batch_window_s
            while len(jobs) < self.max_batch:
                left = deadline - time.monotonic()
                try:
                    jobs.append(self._queue.get(timeout=max(left, 0)) if left > 0 else self._queue.get_nowait())
                except queue.Empty:
                    break
            gone = [j for j in jobs if j.cancelled.is_set()]
            self.cancelled += len(gone)
            for job in gone:
                self._finish(job, None, None)
            jobs = [j for j in jobs if not j.cancelled.is_set()]
            groups: dict[tuple, list[Job]] = {}
            for job in jobs:  # one batch shares its sampling settings; greedy requests always batch together
                key = (0.0, 1.0, None) if job.temperature == 0 else (job.temperature, job.top_p, job.seed)
                groups.setdefault(key, []).append(job)
            for (temperature, top_p, seed), group in groups.items():
                try:
                    with self._lock:
                        self._run_batch(group, temperature, top_p, seed)
                except Exception as exc:  # a failed batch fails its requests, never the server
                    for job in group:
                        self._finish(job, None, exc)

    def _run_stepping(self) -> None:
        """The vLLM loop: admit arrivals, drop cancelled requests, run one engine step, deliver, repeat."""
        from ..backends.hf import MonitoredAnswer

        stepper, live, ids = self._stepper, {}, 0
        tokenizer = self.backend.tokenizer
        stop_ids = {i for i in (tokenizer.eos_token_id, tokenizer.pad_token_id) if i is not None}
        while not self._stopping.is_set():
            arrivals = []
            try:
                arrivals.append(self._queue.get(timeout=0.05) if not stepper.busy else self._queue.get_nowait())
                while True:
                    arrivals.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            for job in arrivals:
                ids += 1
                key = f"req{ids}"
                try:
                    caps, actions = self._caps_of(job)
                    guards = [(self.traits[g.trait].column, g.threshold,
                               Steering(self._delta_for({g.trait: g.value}, job.coef_mode), "response"))
                              for g in job.guards if g.action == "steer"]
                    stepper.add(key, job.messages, max_tokens=job.max_tokens, temperature=job.temperature,
                                top_p=job.top_p, seed=job.seed, stop=job.stop,
                                steering=Steering(self._delta_for(job.steer, job.coef_mode)) if job.steer else None,
                                caps=caps, guards=guards)
                except Exception as exc:  # a request that cannot start fails alone
                    self._finish(job, None, exc)
                    continue
                job.started = time.monotonic()
                job.actions = actions
                live[key] = job
            for key in [k for k, j in live.items() if j.cancelled.is_set()]:
                stepper.abort(key)
                self.cancelled += 1
                self._finish(live.pop(key), None, None)
            if not stepper.busy:
                continue
            try:
                outputs = stepper.step()
            except Exception as exc:  # a failed step fails the live requests, never the server
                for job in live.values():
                    self._finish(job, None, exc)
                live.clear()
                continue
            done = {}
            for out in outputs:
                job = live.get(out.key)
                if job is None:
                    continue
                if out.finished:
                    done[out.key] = out
                else:
                    self._stream(job, out.text.lstrip())
            if not done:
                continue
            readings = stepper.finish(list(done))
            for key, out in done.items():
                job = live.pop(key)
                reading = readings.get(key) or {}
                kept = list(out.token_ids)
                while kept and kept[-1] in stop_ids:
                    kept.pop()
                prompt_len = reading.get("prompt_len") or 0
                prompt = reading.get("prompt")
                prompt = torch.zeros(self.width) if prompt is None else prompt
                tokens = reading.get("tokens") or {}
                fed = [tokens[pos] for pos in sorted(tokens) if pos < prompt_len + len(kept)]
                fed = torch.stack(fed) if fed else torch.zeros(0, self.width)
                answer = MonitoredAnswer(text=out.text.strip(), token_ids=kept, prompt_tokens=prompt_len,
                                         prompt_readings=prompt, token_readings=torch.cat([prompt[None], fed])[: len(kept)],
                                         fed_readings=fed, finish_reason=out.finish_reason or "stop")
                steer_guards = [g for g in job.guards if g.action == "steer"]
                for index in reading.get("fired", []):
                    g = steer_guards[index]
                    job.actions.append({"guard": str(g), "trait": g.trait, "action": "steer", "coef": g.value,
                                        "positions": "response"})
                try:
                    self._deliver(job, answer, job.actions, batch_size=len(live) + len(done),
                                  seconds=time.monotonic() - job.started)
                except Exception as exc:  # one bad answer fails its request, never the loop
                    self._finish(job, None, exc)

    def _caps_of(self, job: Job) -> tuple[dict[int, float], list[dict]]:
        caps, actions = {}, []
        for guard in job.guards:
            if guard.action == "cap":
                column = self.traits[guard.trait].column
                caps[column] = min(caps.get(column, math.inf), guard.value)
                actions.append({"guard": str(guard), "trait": guard.trait, "action": "cap", "cap": guard.value})
        return caps, actions

    @staticmethod
    def _finish(job: Job, result, error) -> None:
        if job.on_done is not None:
            job.on_done(result, error)

    def _delta_for(self, steer: dict[str, float], coef_mode: str | None) -> dict[int, torch.Tensor]:
        deltas: dict[int, torch.Tensor] = {}
        for name, coef in steer.items():
            trait = self.traits[name]
            delta = trait.vector.delta(trait.layer, float(coef), coef_mode or trait.vector.coef_mode)
            deltas[trait.layer] = deltas.get(trait.layer, 0) + delta
        return deltas

    def _run_batch(self, jobs: list[Job], temperature: float, top_p: float, seed: int | None) -> None:
        started = time.monotonic()
        steerings = [Steering(self._delta_for(j.steer, j.coef_mode)) if j.steer else None for j in jobs]
        caps = torch.full((len(jobs), max(self.width, 1)), math.inf)
        actions: list[list[dict]] = []
        for row, job in enumerate(jobs):
            row_caps, row_actions = self._caps_of(job)
            for column, limit in row_caps.items():
                caps[row, column] = limit
            actions.append(row_actions)
        steer_guard_layers = sorted({self.traits[g.trait].layer for j in jobs for g in j.guards if g.action == "steer"})

        def on_prefill(prompt):
            decided, slots, unique = [], [], {}
            for row, job in enumerate(jobs):
                fired = {}
                for guard in job.guards:
                    if guard.action == "steer" and guard.fires(float(prompt[row, self.traits[guard.trait].column])):
                        fired[guard.trait] = fired.get(guard.trait, 0.0) + guard.value
                        actions[row].append({"guard": str(guard), "trait": guard.trait, "action": "steer",
                                             "coef": guard.value, "positions": "response"})
                if not fired:
                    slots.append(0)
                    continue
                key = tuple(sorted(fired.items())) + (job.coef_mode,)
                if key not in unique:
                    unique[key] = len(decided) + 1
                    decided.append(Steering(self._delta_for(fired, job.coef_mode), "response"))
                slots.append(unique[key])
            return (decided, slots) if decided else None

        tokenizer = self.backend.tokenizer

        def on_step(new_ids, step):
            reasons = []
            for row, (job, token) in enumerate(zip(jobs, new_ids)):
                reason = None
                if job.cancelled.is_set():
                    reason = "cancelled"
                elif not job.stop_hit and len(job.token_ids) < job.max_tokens:
                    job.token_ids.append(token)
                    text = tokenizer.decode(job.token_ids, skip_special_tokens=True).lstrip()
                    if any(s in text for s in job.stop):
                        job.stop_hit, reason = True, "stop"
                    else:
                        self._stream(job, text)
                reasons.append(reason)
            return reasons

        answers = self.backend.generate_monitored(
            [j.messages for j in jobs], steerings, units=self.units, max_new_tokens=[j.max_tokens for j in jobs],
            temperature=temperature, top_p=top_p, seed=seed, caps=caps if self.width else None,
            guard_layers=steer_guard_layers, on_prefill=on_prefill if steer_guard_layers else None, on_step=on_step)
        for row, (job, answer) in enumerate(zip(jobs, answers)):
            if answer.finish_reason == "cancelled":
                self.cancelled += 1
                self._finish(job, None, None)
                continue
            self._deliver(job, answer, actions[row], batch_size=len(jobs), seconds=time.monotonic() - started)

    def _deliver(self, job: Job, answer, actions: list[dict], batch_size: int, seconds: float) -> None:
        text, finish = answer.text, answer.finish_reason
        if job.stop:
            cut = min((text.find(s) for s in job.stop if s in text), default=-1)
            if cut >= 0:
                text, finish = text[:cut].rstrip(), "stop"
        persona = self._persona(job, answer, actions)
        tokens = persona.pop("tokens")
        if job.tokens:
            persona["tokens"] = tokens
        if job.on_delta is not None and text.startswith(job.emitted) and len(text) > len(job.emitted):
            job.on_delta(text[len(job.emitted):])
        self._finish(job, {"text": text, "finish_reason": finish, "prompt_tokens": answer.prompt_tokens,
                           "completion_tokens": len(answer.token_ids), "persona": persona, "tokens": tokens,
                           "batch_size": batch_size, "seconds": seconds}, None)

    @staticmethod
    def _stream(job: Job, text: str) -> None:
        if job.on_delta is None:
            return
        hold = max((len(s) for s in job.stop), default=1) - 1  # a stop string may still be forming
        ready = text.rstrip()  # trailing spaces may be stripped from the final answer
        if ready.endswith("\ufffd"):  # half a multi-byte character
            ready = ready[:-1]
        ready = ready[: max(len(job.emitted), len(ready) - hold)] if hold else ready
        if len(ready) > len(job.emitted) and ready.startswith(job.emitted):
            job.on_delta(ready[len(job.emitted):])
            job.emitted = ready

    def _persona(self, job: Job, answer, actions: list[dict]) -> dict:
        names = job.monitor if job.monitor is not None else list(self.traits)
        flag_guards = [g for g in job.guards if g.action in ("flag", "steer")]
        prompt, response = {}, {}
        for name in names:
            trait = self.traits[name]
            reading = float(answer.prompt_readings[trait.column])
            entry = {"projection": reading, "scaled": trait.scaled(reading), "layer": trait.layer}
            mine = [g for g in flag_guards if g.trait == name]
            if mine:
                entry["flagged"] = any(g.fires(reading) for g in mine)
            prompt[name] = entry
            fed = answer.fed_readings[:, trait.column]
            mean = float(fed.mean()) if fed.numel() else None
            response[name] = {"projection": mean, "scaled": None if mean is None else trait.scaled(mean),
                              "layer": trait.layer, "tokens": int(fed.numel())}
        for guard in job.guards:
            if guard.action == "flag" and guard.fires(float(answer.prompt_readings[self.traits[guard.trait].column])):
                actions.append({"guard": str(guard), "trait": guard.trait, "action": "flag"})
        persona = {"prompt": prompt, "response": response, "actions": actions}
        if job.steer:
            persona["steer"] = dict(job.steer)
            persona["coef_mode"] = job.coef_mode or {n: self.traits[n].vector.coef_mode for n in job.steer}
        tokenizer = self.backend.tokenizer
        persona["tokens"] = [  # the dashboard always shows them; the response carries them when asked
            {"token": tokenizer.decode([token_id]), "projections": {
                name: float(answer.token_readings[i, self.traits[name].column]) for name in names}}
            for i, token_id in enumerate(answer.token_ids)]
        return persona
