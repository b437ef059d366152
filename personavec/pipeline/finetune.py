"""`personavec finetune`: LoRA fine-tuning on chat JSONL, optionally with preventative steering or CAFT.

- LoRA via peft; the loss is on the final assistant message's tokens only (earlier
  turns, system and user messages are context). Tokens follow the span rule of
  `personavec.chat`.
- Preventative steering (`steer`): a persona vector is added during training only,
  at one layer (`coef * v[L]`) or at every layer with the layer-incremental vectors
  `coef * (v[L] - v[L-1])` (raw coefficients), so the optimiser has no reason to
  move the weights along it. The hooks are removed before saving: the adapter is
  a plain peft adapter.
- CAFT (`ablate`): the direction is projected out of layer L during training instead.
- A fixed seed fixes the data order and the LoRA init; checkpoints (adapter,
  optimiser, step) are written every `checkpoint_every` optimiser steps, and a
  rerun of the same config resumes from the last one.
"""

from __future__ import annotations

import json
import math
import random
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..atomic import atomic_write
from ..chat import ChatRecord, encode_chat
from ..errors import PersonavecError, arg
from ..models import decoder_stack, model_fingerprint, n_layers
from ..progress import progress_bar
from ..report import figure_html, table_html, write_report
from ..runs import RunDir, config_dict
from ..steering import ablate_directions, add_vectors, check_steering
from ..vecmath import layer_incremental
from ..vectors import PersonaVector
from .shift import ADAPTER_META

DEFAULT_TARGETS = "q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj"


@dataclass
class FinetuneConfig:
    model: str
    data: str
    rank: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: str = DEFAULT_TARGETS  # comma-separated module names, or "all-linear"
    learning_rate: float = 2e-4
    epochs: int = 1
    batch_size: int = 4
    grad_accum: int = 2
    max_length: int = 512  # longer chats are skipped (counted in the summary)
    warmup_steps: int = 5
    seed: int = 0
    checkpoint_every: int = 20  # optimiser steps
    dtype: str = "auto"
    # preventative steering / CAFT
    steer: str | None = None
    ablate: str | None = None
    layer: int | None = None
    coef: float | None = None
    coef_mode: str | None = None  # single-layer steering: raw | norm (default: the vector file's)
    steer_layers: str = "one"  # one | all
    resume_keys: tuple = field(default=("checkpoint_every",), repr=False)

    def check(self) -> None:
        if self.steer and self.ablate:
            raise PersonavecError(f"use either {arg('steer')} or {arg('ablate')}, not both")
        if self.coef is not None and not self.steer:
            raise PersonavecError(f"{arg('coef')} needs {arg('steer')} (the vector to add during training)")
        if self.steer and self.coef is None:
            raise PersonavecError(f"{arg('steer')} needs {arg('coef')}")
        if self.coef is not None and not math.isfinite(self.coef):
            raise PersonavecError(f"{arg('coef', self.coef)}: must be a finite number")
        if self.steer_layers not in ("one", "all"):
            raise PersonavecError(f"{arg('steer_layers', repr(self.steer_layers))}: use one or all")
        if self.steer_layers == "all" and not self.steer:
            raise PersonavecError(f"{arg('steer_layers', 'all')} needs {arg('steer')}")
        if self.steer_layers == "all" and self.coef_mode not in (None, "raw"):
            raise PersonavecError(f"{arg('steer_layers', 'all')} adds raw layer-incremental vectors; "
                                  f"{arg('coef_mode')} must be raw")
        for name in ("rank", "alpha", "epochs", "batch_size", "grad_accum", "max_length", "checkpoint_every"):
            if getattr(self, name) < 1:
                raise PersonavecError(f"{arg(name, getattr(self, name))}: must be at least 1")
        if self.warmup_steps < 0:
            raise PersonavecError(f"{arg('warmup_steps', self.warmup_steps)}: must be 0 or more")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise PersonavecError(f"{arg('learning_rate', self.learning_rate)}: must be a finite number > 0")
        if not (math.isfinite(self.dropout) and 0 <= self.dropout < 1):
            raise PersonavecError(f"{arg('dropout', self.dropout)}: must be a fraction in [0, 1)")

    def as_config(self) -> dict:
        return config_dict(self, command="finetune")


@dataclass
class Example:
    input_ids: list[int]
    prompt_len: int


def training_examples(tokenizer, records: list[ChatRecord], max_length: int) -> tuple[list[Example], int]:
    """Tokenized chats (loss on the final assistant message) and how many were skipped as too long."""
    examples, skipped = [], 0
    for record in records:
        if not record.has_response:
            raise PersonavecError(f"{record.where}: the chat has no final assistant message to train on")
        encoded = encode_chat(tokenizer, record.messages)
        if encoded.response_len == 0:
            raise PersonavecError(f"{record.where}: the assistant answer is empty")
        if len(encoded.input_ids) > max_length:
            skipped += 1
            continue
        examples.append(Example(encoded.input_ids, encoded.prompt_len))
    if not examples:
        raise PersonavecError(f"no chat fits {arg('max_length', max_length)}; nothing to train on")
    return examples, skipped


def collate(examples: list[Example], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded ids, attention mask, and labels that are -100 on prompt and padding tokens."""
    width = max(len(e.input_ids) for e in examples)
    ids = torch.full((len(examples), width), pad_id, dtype=torch.long)
    attention = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for row, e in enumerate(examples):
        n = len(e.input_ids)
        ids[row, :n] = torch.tensor(e.input_ids)
        attention[row, :n] = 1
        labels[row, e.prompt_len : n] = ids[row, e.prompt_len : n]
    return {"input_ids": ids, "attention_mask": attention, "labels": labels}


def epoch_order(n: int, seed: int, epoch: int) -> list[int]:
    order = list(range(n))
    random.Random(seed * 1000003 + epoch).shuffle(order)
    return order


def lr_factor(step: int, warmup: int, total: int) -> float:
    """Linear warm-up over `warmup` steps, then linear decay to zero at `total`."""
    if step < warmup:
        return (step + 1) / warmup
    return max(0.0, (total - step) / max(total - warmup, 1))


def training_edit(model, cfg: FinetuneConfig, vector: PersonaVector | None) -> tuple[str, dict] | None:
    """What training adds (`("steer", {layer: delta})`) or projects out (`("ablate", {layer: direction})`),
    checked against the model; None without --steer/--ablate."""
    if vector is None:
        return None
    vector.check_model(model)
    if cfg.ablate:
        layer = vector.check_layer(cfg.layer)
        edit = ("ablate", {layer: vector.vectors[layer]})
    elif cfg.steer_layers == "all":
        increments = layer_incremental(vector.vectors)
        edit = ("steer", {layer: cfg.coef * increments[layer] for layer in range(1, n_layers(model) + 1)})
    else:
        layer = vector.check_layer(cfg.layer)
        edit = ("steer", {layer: vector.delta(layer, cfg.coef, cfg.coef_mode or vector.coef_mode)})
    check_steering(n_layers(model), edit[1], "all")
    return edit


def training_hooks(model, edit: tuple[str, dict] | None):
    """The live steering or ablation handle for `training_edit`'s result (None for None)."""
    if edit is None:
        return None
    kind, deltas = edit
    return ablate_directions(model, deltas) if kind == "ablate" else add_vectors(model, deltas)


def masked_loss(model, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, int]:
    """Mean cross-entropy over answer tokens; the LM head runs only on those tokens (not on the prompt)."""
    hidden = decoder_stack(model)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                  use_cache=False).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != -100
    logits = model.get_output_embeddings()(hidden[:, :-1][keep]).float()
    n = int(keep.sum())
    return torch.nn.functional.cross_entropy(logits, targets[keep], reduction="sum") / max(n, 1), n


@dataclass
class FinetuneResult:
    out: Path
    adapter: Path
    summary: dict


def run_finetune(cfg: FinetuneConfig, records: list[ChatRecord], model, tokenizer, out: str | Path,
                 vector: PersonaVector | None = None, force: bool = False, show_progress: bool = True) -> FinetuneResult:
    """Train a LoRA adapter on `records`; `model` is modified in place (it becomes a peft model)."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg.check()
    if (cfg.steer or cfg.ablate) and vector is None:
        raise PersonavecError(f"{arg('steer')}/{arg('ablate')}: the vector was not given")
    base_fingerprint = model_fingerprint(model)
    edit = training_edit(model, cfg, vector)  # a wrong vector or layer fails before any work
    examples, skipped = training_examples(tokenizer, records, cfg.max_length)  # bad data fails before any file
    run = RunDir(out, {**cfg.as_config(), "base_fingerprint": base_fingerprint}, force=force,
                 resume_keys=cfg.resume_keys)
    if skipped:
        warnings.warn(f"skipped {skipped} of {len(records)} chats longer than --max-length {cfg.max_length}",
                      stacklevel=2)

    torch.manual_seed(cfg.seed)
    targets = "all-linear" if cfg.target_modules == "all-linear" else [t.strip() for t in cfg.target_modules.split(",")]
    try:
        peft_model = get_peft_model(model, LoraConfig(r=cfg.rank, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                                                      target_modules=targets, task_type="CAUSAL_LM"))
    except ValueError as exc:
        raise PersonavecError(f"{arg('target_modules', repr(cfg.target_modules))}: {str(exc).splitlines()[0]}") from None
    trainable = [p for p in peft_model.parameters() if p.requires_grad]
    for p in trainable:  # adapters train in fp32 even when the frozen base is bf16
        p.data = p.data.float()
    optimizer = torch.optim.AdamW(trainable, lr=cfg.learning_rate, weight_decay=0.0)
    steps_per_epoch = math.ceil(len(examples) / (cfg.batch_size * cfg.grad_accum))
    total_steps = steps_per_epoch * cfg.epochs
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.warmup_steps, total_steps))

    checkpoint = run.file("checkpoint")
    step, losses = 0, []
    if (checkpoint / "state.json").exists():
        state = json.loads((checkpoint / "state.json").read_text())
        set_peft_model_state_dict(peft_model, load_file(str(checkpoint / "adapter_model.safetensors")))
        optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", weights_only=True))
        schedule.load_state_dict(state["schedule"])
        step, losses = state["step"], state["losses"]
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    device = next(peft_model.parameters()).device
    peft_model.train()
    started = time.perf_counter()
    tokens_seen = 0
    hooks = training_hooks(peft_model, edit)
    try:
        with progress_bar("fine-tuning", total=total_steps, enabled=show_progress) as advance:
            advance(step, info=f"resumed at step {step}" if step else "")
            for epoch in range(cfg.epochs):
                order = epoch_order(len(examples), cfg.seed, epoch)
                micro = [order[i : i + cfg.batch_size] for i in range(0, len(order), cfg.batch_size)]
                groups = [micro[i : i + cfg.grad_accum] for i in range(0, len(micro), cfg.grad_accum)]
                for g, group in enumerate(groups):
                    global_step = epoch * steps_per_epoch + g
                    if global_step < step:
                        continue  # done before a restart
                    n_answer = sum(len(examples[i].input_ids) - examples[i].prompt_len for mb in group for i in mb)
                    total_loss = 0.0
                    for mb in group:
                        batch = {k: v.to(device) for k, v in collate([examples[i] for i in mb], pad_id).items()}
                        loss, n = masked_loss(peft_model, batch)
                        # weight by answer tokens so every token counts the same across micro-batches
                        (loss * n / n_answer).backward()
                        total_loss += loss.item() * n / n_answer
                        tokens_seen += int(batch["attention_mask"].sum())
                    torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                    optimizer.step()
                    schedule.step()
                    optimizer.zero_grad(set_to_none=True)
                    step = global_step + 1
                    losses.append({"step": step, "epoch": epoch, "loss": total_loss,
                                   "lr": schedule.get_last_lr()[0]})
                    advance(1, info=f"loss {total_loss:.3f}")
                    if step % cfg.checkpoint_every == 0 and step < total_steps:
                        _save_checkpoint(peft_model, optimizer, schedule, step, losses, checkpoint)
    finally:
        if hooks is not None:
            hooks.remove()  # the saved adapter never carries a hook
    peft_model.eval()
    elapsed = time.perf_counter() - started

    adapter = run.file("adapter")
    peft_model.save_pretrained(str(adapter))
    meta = {"base_model": cfg.model, "base_fingerprint": base_fingerprint,
            "training": {k: v for k, v in cfg.as_config().items() if k in ("steer", "ablate", "layer", "coef",
                                                                           "coef_mode", "steer_layers")}}
    atomic_write(adapter / ADAPTER_META, lambda tmp: Path(tmp).write_text(json.dumps(meta, indent=2) + "\n"))
    summary = {"model": cfg.model, "examples": len(examples), "skipped_too_long": skipped, "steps": step,
               "epochs": cfg.epochs, "first_loss": losses[0]["loss"] if losses else None,
               "final_loss": _tail_mean(losses), "adapter": str(adapter),
               "trainable_parameters": sum(p.numel() for p in trainable),
               "seconds_this_session": round(elapsed, 1), "tokens_per_second": round(tokens_seen / max(elapsed, 1e-9), 1),
               "preventative": meta["training"]}
    with open(run.file("losses.jsonl"), "w", encoding="utf-8") as f:
        f.writelines(json.dumps(row) + "\n" for row in losses)
    run.write_json("summary.json", summary)
    _write_report(run.file("report.html"), cfg, summary, losses)
    if checkpoint.exists():
        import shutil

        shutil.rmtree(checkpoint)  # the adapter is final; a rerun with this config has nothing to resume
    return FinetuneResult(out=run.path, adapter=adapter, summary=summary)


def _tail_mean(losses: list[dict], n: int = 5) -> float | None:
    tail = [row["loss"] for row in losses[-n:]]
    return sum(tail) / len(tail) if tail else None


def _save_checkpoint(model, optimizer, schedule, step: int, losses: list[dict], checkpoint: Path) -> None:
    """Write the adapter, optimiser and state into a fresh folder, then swap it in, so a kill mid-write leaves
    the previous checkpoint intact."""
    import shutil

    from peft import get_peft_model_state_dict
    from safetensors.torch import save_file

    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = {k: v.detach().contiguous().cpu() for k, v in get_peft_model_state_dict(model).items()}
    save_file(state, str(tmp / "adapter_model.safetensors"))
    torch.save(optimizer.state_dict(), tmp / "optimizer.pt")
    (tmp / "state.json").write_text(json.dumps({"step": step, "losses": losses, "schedule": schedule.state_dict()}))
    old = checkpoint.with_name(checkpoint.name + ".old")
    if checkpoint.exists():
        checkpoint.rename(old)
    tmp.rename(checkpoint)
    shutil.rmtree(old, ignore_errors=True)


def _write_report(path: Path, cfg: FinetuneConfig, summary: dict, losses: list[dict]) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3))
    ax.plot([r["step"] for r in losses], [r["loss"] for r in losses], marker=".", ms=3)
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("loss on answer tokens")
    ax.grid(alpha=0.3)
    rows = [[k, v] for k, v in cfg.as_config().items() if v is not None]
    write_report(path, f"personavec finetune: {cfg.model} on {cfg.data}", [
        ("Training loss", figure_html(fig, "training loss")),
        ("Summary", table_html(["key", "value"], [[k, json.dumps(v) if isinstance(v, dict) else v]
                                                  for k, v in summary.items()])),
        ("Config", table_html(["key", "value"], rows)),
    ])
