"""`PersonaVector`: one trait direction per layer, its file format and its conversions.

File format (safetensors, DESIGN.md):
- `vectors`: float32 `[n_layers + 1, hidden]`, the raw mean difference at the
  response average, row L = layer L (0 = embeddings, i = output of block i);
- optional `prompt_avg`, `prompt_last` (same shape) and `norms` (`[n_layers + 1]`,
  the mean L2 norm of a response token at each layer, used for coefficients
  relative to the activation norm);
- string metadata; numbers and structured values are JSON.

Layer numbering is converted only here, at the export/import boundary:
- llama.cpp control vectors: tensor `direction.k` is added to the output of
  llama.cpp's 0-based layer k, i.e. block k+1, so `direction.k = v[k + 1]`.
  llama.cpp never steers its layer 0 (`direction.0` is invalid), so v[0] and
  v[1] cannot be exported; use `--control-vector-layer-range k k` there to
  steer only our layer k + 1.
- the paper's `.pt`: the same `[n_layers + 1, hidden]` rows as ours.
"""

from __future__ import annotations

import json
import math
import warnings
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import torch

from . import __version__
from .atomic import atomic_write
from .errors import PersonavecError, arg
from .backends import as_backend
from .steering import add_vectors
from .vecmath import mean_difference, scale01, unit

COEF_MODES = ("raw", "norm")
_JSON_KEYS = ("layer", "coef", "n_pos", "n_neg", "counts", "extra")


@dataclass
class PersonaVector:
    """A persona vector for every layer of one model, with the metadata that gives it meaning."""

    vectors: torch.Tensor
    trait: str = ""
    model: str = ""
    fingerprint: str = ""
    position: str = "response_avg"
    prompt_avg: torch.Tensor | None = None
    prompt_last: torch.Tensor | None = None
    norms: torch.Tensor | None = None
    # [n_layers + 1, 4]: mean and sd of the pos answers' projections on v_hat[L], then the neg answers'
    projection_stats: torch.Tensor | None = None
    layer: int | None = None
    coef: float | None = None
    coef_mode: str = "raw"
    n_pos: int = 0
    n_neg: int = 0
    counts: dict = field(default_factory=dict)
    extra: dict = field(default_factory=dict)
    source: str = ""  # the file it was read from, for error messages

    def __post_init__(self) -> None:
        self.vectors = self.vectors.detach().float().cpu()
        if self.vectors.dim() != 2:
            raise PersonavecError(f"{self.label}: vectors must be 2-D [n_layers + 1, hidden], got {tuple(self.vectors.shape)}")
        for name in ("vectors", "prompt_avg", "prompt_last", "norms", "projection_stats"):
            value = getattr(self, name)
            if value is not None and not torch.isfinite(value).all():
                raise PersonavecError(f"{self.label}: tensor {name!r} contains NaN or inf")

    @property
    def label(self) -> str:
        return self.source or f"vector {self.trait or '(unnamed)'}"

    @property
    def n_layers(self) -> int:
        return self.vectors.shape[0] - 1

    @property
    def hidden(self) -> int:
        return self.vectors.shape[1]

    # -- construction ------------------------------------------------------
    @classmethod
    def from_activations(cls, pos, neg, model=None, trait: str = "", **metadata) -> "PersonaVector":
        """Mean difference of two `Activations` captured at every layer (0..n_layers)."""
        if pos.layers != neg.layers or pos.layers != list(range(len(pos.layers))):
            raise PersonavecError("pos and neg activations must both cover every layer 0..n_layers")
        # Chats skipped as too long hold zero rows: they are not in the means, nor in the counts.
        pos, neg = pos.kept(), neg.kept()
        for side, acts in (("pos", pos), ("neg", neg)):
            if acts.n_chats == 0:
                raise PersonavecError(f"{side}: no chat is left to average (every one was skipped as longer than "
                                      "the context limit)")

        def diff(position):
            a, b = getattr(pos, position), getattr(neg, position)
            return None if a is None or b is None else mean_difference(a, b)

        norms = torch.cat([pos.token_norm, neg.token_norm]).mean(0) if pos.token_norm is not None else None
        main = "response_avg" if pos.response_avg is not None else "prompt_avg"
        vector = cls(
            vectors=diff("response_avg") if pos.response_avg is not None else diff("prompt_avg"),
            prompt_avg=diff("prompt_avg"), prompt_last=diff("prompt_last"), norms=norms, trait=trait,
            position="response_avg" if pos.response_avg is not None else "prompt_avg",
            n_pos=pos.n_chats, n_neg=neg.n_chats,
            **metadata,
        )
        vector.projection_stats = projection_stats(getattr(pos, main), getattr(neg, main), vector.vectors)
        if model is not None:
            vector.model = vector.model or str(getattr(model, "name_or_path", ""))
            vector.fingerprint = as_backend(model).fingerprint()
        return vector

    # -- use -----------------------------------------------------------------
    def at(self, position: str) -> torch.Tensor:
        """The `[n_layers + 1, hidden]` tensor for a position: response_avg (the main one), prompt_avg, prompt_last."""
        table = {"response_avg": self.vectors, "prompt_avg": self.prompt_avg, "prompt_last": self.prompt_last}
        if position not in table:
            raise PersonavecError(f"{arg('position', repr(position))}: use response_avg, prompt_avg or prompt_last")
        if table[position] is None:
            raise PersonavecError(f"{self.label}: has no {position!r} vectors")
        return table[position]

    def check_layer(self, layer: int | None) -> int:
        layer = self.layer if layer is None else layer
        if layer is None:
            raise PersonavecError(f"{self.label}: records no layer; pass {arg('layer')}")
        if not 0 <= layer <= self.n_layers:
            raise PersonavecError(f"{arg('layer', layer)} is out of range: {self.label} has layers 0..{self.n_layers}")
        return layer

    def check_nonzero(self, layer: int) -> None:
        """Refuse to steer or read along the vector at a layer where it is all zeros (it has no direction there:
        e.g. a layer that a single-layer GGUF file does not hold)."""
        if not bool(self.vectors[layer].any()):
            raise PersonavecError(f"{self.label}: the vector at layer {layer} is all zeros, so it has no direction "
                                  "to steer or read along; choose another layer or another vector")

    def direction(self, layer: int | None = None) -> torch.Tensor:
        """The unit vector at a layer (the recorded one by default)."""
        return unit(self.vectors[self.check_layer(layer)])

    def delta(self, layer: int, coef: float, coef_mode: str = "raw") -> torch.Tensor:
        """What steering adds at `layer`: `coef * v[L]` (raw), or `coef * norms[L] * v_hat[L]` (norm).

        With coef_mode "norm", coef 1 adds a vector as long as a typical
        response token at that layer, which makes coefficients comparable
        across layers.
        """
        layer = self.check_layer(layer)
        try:
            finite = math.isfinite(float(coef))
        except (TypeError, ValueError):
            finite = False
        if not finite:
            raise PersonavecError(f"{arg('coef', coef)}: the steering coefficient must be a finite number")
        if coef_mode not in COEF_MODES:
            raise PersonavecError(f"{arg('coef_mode', repr(coef_mode))}: use raw or norm")
        self.check_nonzero(layer)
        if coef_mode == "raw":
            return coef * self.vectors[layer]
        if coef_mode == "norm":
            if self.norms is None:
                raise PersonavecError(f"{self.label}: has no activation norms; use {arg('coef_mode', 'raw')}")
        return coef * float(self.norms[layer]) * unit(self.vectors[layer])

    def check_model(self, model) -> None:
        """Refuse a model whose shape differs; warn when the fingerprint differs (e.g. a fine-tune of it)."""
        backend = as_backend(model)
        layers, hidden = backend.n_layers, backend.hidden_size
        if (layers, hidden) != (self.n_layers, self.hidden):
            raise PersonavecError(
                f"{self.label}: made for a model with {self.n_layers} layers and hidden size {self.hidden}, "
                f"but this model has {layers} layers and hidden size {hidden}"
            )
        if self.fingerprint and self.fingerprint != backend.fingerprint():
            warnings.warn(f"{self.label}: made on {self.model or 'another checkpoint'} (fingerprint differs); "
                          "fine if this model is a fine-tune of it", stacklevel=2)

    def apply(self, model, layer: int | None = None, coef: float | None = None, positions: str = "all",
              coef_mode: str | None = None):
        """Steer `model` with this vector; a context manager. Defaults come from the file's metadata."""
        self.check_model(model)
        layer = self.check_layer(layer)
        coef = self.coef if coef is None else coef
        if coef is None:
            raise PersonavecError(f"{self.label}: records no coefficient; pass {arg('coef')}")
        return add_vectors(model, {layer: self.delta(layer, coef, coef_mode or self.coef_mode)}, positions)

    # -- safetensors ---------------------------------------------------------
    def scale_at(self, layer: int | None = None) -> tuple[float, float] | None:
        """(neg_mean, pos_mean) of the vector's own answers projected at `layer` (default: its layer), for the
        0..1 scale; None when the file records no statistics or they coincide."""
        layer = self.layer if layer is None else layer
        if layer is None:
            return None
        if self.projection_stats is not None:
            pos_mean, _, neg_mean, _ = (float(x) for x in self.projection_stats[layer])
        elif self.extra.get("stats_layer") == layer and "pos_mean" in self.extra:  # e.g. an older file's metadata
            pos_mean, neg_mean = float(self.extra["pos_mean"]), float(self.extra["neg_mean"])
        else:
            return None
        return None if pos_mean == neg_mean else (neg_mean, pos_mean)

    def scaled(self, reading: float, layer: int | None = None) -> float | None:
        scale = self.scale_at(layer)
        return None if scale is None else float(scale01(reading, *scale))

    def metadata(self) -> dict[str, str]:
        values = {
            "format": "personavec", "trait": self.trait, "model": self.model, "model_fingerprint": self.fingerprint,
            "position": self.position, "coef_mode": self.coef_mode, "layer": self.layer, "coef": self.coef,
            "n_pos": self.n_pos, "n_neg": self.n_neg, "counts": self.counts, "extra": self.extra,
            "personavec_version": __version__, "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        }
        if self.projection_stats is not None and self.layer is not None:  # the contract's plain numbers at the layer
            stats = [float(x) for x in self.projection_stats[self.layer]]
            values.update({name: repr(value) for name, value in zip(("pos_mean", "pos_sd", "neg_mean", "neg_sd"), stats)})
        return {k: v if isinstance(v, str) else json.dumps(v) for k, v in values.items()}

    def tensors(self) -> dict[str, torch.Tensor]:
        out = {"vectors": self.vectors.contiguous()}
        for name in ("prompt_avg", "prompt_last", "norms", "projection_stats"):
            if getattr(self, name) is not None:
                out[name] = getattr(self, name).float().contiguous().clone()  # safetensors refuses shared memory
        return out

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        atomic_write(path, lambda tmp: save_file(self.tensors(), str(tmp), metadata=self.metadata()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> "PersonaVector":
        from safetensors import SafetensorError
        from safetensors.torch import safe_open

        path = Path(path)
        if not path.exists():
            raise PersonavecError(f"{path}: no such file")
        if path.suffix in (".gguf", ".pt"):
            return import_vector(path)
        try:
            with safe_open(str(path), framework="pt") as f:
                names = set(f.keys())
                meta = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in names}
        except (SafetensorError, OSError, ValueError) as exc:
            raise PersonavecError(f"{path}: not a safetensors vector file ({exc})") from None
        if "vectors" not in tensors:
            raise PersonavecError(f"{path}: has no tensor named 'vectors' (found: {', '.join(sorted(names)) or 'none'})")
        parsed = {}
        for k, v in meta.items():
            try:
                parsed[k] = json.loads(v) if k in _JSON_KEYS else v
            except ValueError:
                raise PersonavecError(f"{path}: metadata {k!r} is not valid JSON: {v[:60]!r}") from None
        vector = cls(
            vectors=tensors["vectors"], prompt_avg=tensors.get("prompt_avg"), prompt_last=tensors.get("prompt_last"),
            norms=tensors.get("norms"), projection_stats=tensors.get("projection_stats"), trait=parsed.get("trait", ""), model=parsed.get("model", ""),
            fingerprint=parsed.get("model_fingerprint", ""), position=parsed.get("position", "response_avg"),
            layer=parsed.get("layer"), coef=parsed.get("coef"), coef_mode=parsed.get("coef_mode", "raw"),
            n_pos=parsed.get("n_pos") or 0, n_neg=parsed.get("n_neg") or 0, counts=parsed.get("counts") or {},
            extra=parsed.get("extra") or {}, source=str(path),
        )
        return vector

    # -- llama.cpp GGUF and the paper's .pt ----------------------------------
    def export_gguf(self, path: str | Path, layers: list[int] | None = None, position: str = "response_avg") -> Path:
        """Write a llama.cpp control vector. `direction.{L-1}` holds our v[L]; L must be in 2..n_layers."""
        import gguf

        rows = self.at(position)
        layers = list(range(2, self.n_layers + 1)) if layers is None else layers
        for layer in layers:
            if not 2 <= layer <= self.n_layers:
                raise PersonavecError(
                    f"{arg('layer', layer)}: llama.cpp control vectors can hold layers 2..{self.n_layers} only "
                    "(llama.cpp never steers its first block's output)")
        path = Path(path)

        def write(tmp: Path) -> None:
            writer = gguf.GGUFWriter(str(tmp), "controlvector")
            writer.add_string("controlvector.model_hint", self.model or "unknown")
            writer.add_uint32("controlvector.layer_count", len(layers))
            writer.add_string("personavec.trait", self.trait)
            writer.add_string("personavec.layer_convention", "direction.k = personavec layer k+1")
            # llama.cpp reads only the direction tensors; this lets personavec read a subset back at the
            # model's real depth (a file holding direction.18 alone is still a vector for a 30-layer model).
            writer.add_uint32("personavec.n_layers", self.n_layers)
            for layer in layers:
                writer.add_tensor(f"direction.{llama_cpp_index(layer)}", rows[layer].numpy().astype("float32"))
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_tensors_to_file()
            writer.close()

        atomic_write(path, write)
        return path

    def export_pt(self, path: str | Path, position: str = "response_avg") -> Path:
        """The paper's layout: one `[n_layers + 1, hidden]` float32 tensor, saved with torch.save."""
        path = Path(path)
        rows = self.at(position).clone()
        atomic_write(path, lambda tmp: torch.save(rows, tmp))
        return path


def llama_cpp_index(layer: int) -> int:
    """Our layer L (output of block L, 1-based) is llama.cpp's `direction.{L-1}` (0-based layer index)."""
    return layer - 1


def from_llama_cpp_index(index: int) -> int:
    return index + 1


def projection_stats(pos: torch.Tensor, neg: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    """Per layer: mean and sd (unbiased; 0 for one answer) of pos and of neg projections on the unit vector.
    `pos`/`neg` are `[n, n_layers + 1, hidden]`; the result is `[n_layers + 1, 4]` (pos mean, pos sd, neg mean, neg sd)."""
    units = unit(vectors.float())  # [L + 1, hidden]
    out = []
    for side in (pos, neg):
        projections = (side.float() * units).sum(-1)  # [n, L + 1]
        sd = projections.std(0, unbiased=True) if projections.shape[0] > 1 else torch.zeros(projections.shape[1])
        out += [projections.mean(0), sd]
    return torch.stack(out, 1)


def import_vector(path: str | Path, n_layers_hint: int | None = None) -> PersonaVector:
    """Read a llama.cpp control vector (.gguf) or the paper's .pt into a PersonaVector."""
    path = Path(path)
    if path.suffix == ".gguf":
        return _import_gguf(path, n_layers_hint)
    if path.suffix == ".pt":
        return _import_pt(path)
    raise PersonavecError(f"{path}: unknown vector format; use .safetensors, .gguf or .pt")


def _import_gguf(path: Path, n_layers_hint: int | None) -> PersonaVector:
    import gguf

    try:
        reader = gguf.GGUFReader(str(path))
    except Exception as exc:  # the gguf reader raises bare ValueErrors and struct errors on junk
        raise PersonavecError(f"{path}: not a GGUF file ({exc})") from None
    arch_field = reader.fields.get("general.architecture")
    arch = bytes(arch_field.parts[arch_field.data[0]]).decode() if arch_field else ""
    if arch != "controlvector":
        raise PersonavecError(f"{path}: GGUF architecture is {arch or 'missing'!r}, not a control vector ('controlvector')")
    rows: dict[int, torch.Tensor] = {}
    for tensor in reader.tensors:
        name = tensor.name
        if not name.startswith("direction."):
            continue
        try:
            index = int(name.split(".", 1)[1])
        except ValueError:
            raise PersonavecError(f"{path}: tensor {name!r} has no layer number") from None
        if index < 1:
            raise PersonavecError(f"{path}: tensor {name!r}: llama.cpp control vectors start at direction.1")
        rows[from_llama_cpp_index(index)] = torch.tensor(tensor.data.copy(), dtype=torch.float32).reshape(-1)
    if not rows:
        raise PersonavecError(f"{path}: control vector has no direction.N tensors")
    hidden = {row.numel() for row in rows.values()}
    if len(hidden) != 1:
        raise PersonavecError(f"{path}: direction tensors have different sizes {sorted(hidden)}")
    recorded = _gguf_int(reader, "personavec.n_layers")  # written by personavec's export
    total = max(n_layers_hint or 0, recorded or 0, max(rows))
    vectors = torch.zeros(total + 1, hidden.pop())
    for layer, row in rows.items():
        vectors[layer] = row
    return PersonaVector(vectors=vectors, model=_gguf_str(reader, "controlvector.model_hint"),
                         trait=_gguf_str(reader, "personavec.trait"), source=str(path),
                         layer=max(rows) if len(rows) == 1 else None,
                         extra={"imported_from": "gguf", "layers_present": sorted(rows)})


def _gguf_str(reader, key: str) -> str:
    field = reader.fields.get(key)
    return bytes(field.parts[field.data[0]]).decode("utf-8", errors="replace") if field else ""


def _gguf_int(reader, key: str) -> int | None:
    field = reader.fields.get(key)
    if field is None:
        return None
    try:
        return int(field.parts[field.data[0]][0])
    except (IndexError, TypeError, ValueError):
        return None


def _import_pt(path: Path) -> PersonaVector:
    import pickle

    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        if "global" not in str(exc).lower():  # not a reference to Python code: garbage the reader chokes on
            raise PersonavecError(f"{path}: not a readable .pt tensor file (corrupt, truncated or another format); "
                                  "export it again with torch.save(tensor, path) or use a .safetensors file") from None
        # weights_only met something other than plain tensors and containers
        raise PersonavecError(f"{path}: holds pickled Python objects besides tensors; personavec reads .pt files "
                              "only as plain tensors (torch.load with weights_only=True), because unpickling a "
                              "file runs code from it. Save the tensor alone, or use a .safetensors file") from None
    except Exception:  # not a zip / legacy torch file at all, truncated, ...
        raise PersonavecError(f"{path}: not a readable .pt tensor file (corrupt, truncated or another format); "
                              "export it again with torch.save(tensor, path) or use a .safetensors file") from None
    if not isinstance(obj, torch.Tensor):
        raise PersonavecError(f"{path}: holds a {type(obj).__name__}, not a tensor [n_layers + 1, hidden]")
    if obj.dim() != 2:
        raise PersonavecError(f"{path}: tensor has shape {tuple(obj.shape)}, expected [n_layers + 1, hidden]")
    return PersonaVector(vectors=obj.float(), source=str(path), extra={"imported_from": "pt"})
