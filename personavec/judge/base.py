"""What every judge shares: the spec string, the SQLite cache and the `Judge` base class.

Every judge call is cached in SQLite (``cache_dir()/judge_cache.sqlite``) under
sha256(judge spec, model fingerprint or server URL, readout tag, prompt) and
committed as it arrives, so a killed run loses nothing and a rerun makes no new
calls (see ``Judge.stats``). The readout tag is ``logprob-0-100-v1`` for a 0-100
number (the key every earlier version wrote, unchanged) and ``yes-no-v1`` for a
yes/no readout, so the two never share an entry.
"""

from __future__ import annotations

import threading
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from ..cache import SqliteCache, cache_dir
from ..errors import PersonavecError
from .scoring import READOUT_TAGS, SCHEME, expected_score, final_score

DEFAULT_LOCAL_JUDGE = "local:qwen2.5-coder-1.5b"


# ---------------------------------------------------------------- spec


@dataclass(frozen=True)
class JudgeSpec:
    kind: str  # "local" | "openai" | "none"
    model: str = ""

    def __str__(self) -> str:
        return "none" if self.kind == "none" else f"{self.kind}:{self.model}"


def parse_spec(spec: str) -> JudgeSpec:
    """``local:<model>``, ``openai:<model>`` or ``none``; anything else is a one-line error."""
    spec = (spec or "").strip()
    if spec == "none":
        return JudgeSpec("none")
    kind, sep, model = spec.partition(":")
    if not sep or kind not in ("local", "openai") or not model.strip():
        raise PersonavecError(f"judge spec {spec!r}: use local:<model>, openai:<model> or none")
    return JudgeSpec(kind, model.strip())


# ---------------------------------------------------------------- cache


def default_cache_path() -> Path:
    return cache_dir() / "judge_cache.sqlite"


class JudgeCache(SqliteCache):
    """Judge scores keyed by a hash of (judge, prompt); shared by every run on this machine."""

    def __init__(self, path: str | Path | None = None):
        super().__init__(path or default_cache_path(), table="judge")


# ---------------------------------------------------------------- judges


class Judge:
    """Base class: caching and bookkeeping. Backends implement `_compute`.

    `stats`: ``calls`` judge calls computed (cache misses), ``cache_hits``,
    ``requests`` HTTP requests sent (API judges; retries by the SDK not counted).
    """

    spec: str = ""
    identity: str = ""  # model fingerprint (local) or server URL (openai): part of the cache key

    def __init__(self, cache: JudgeCache | str | Path | None = None):
        self.cache = cache if isinstance(cache, JudgeCache) else JudgeCache(cache)
        self.stats = {"calls": 0, "cache_hits": 0, "requests": 0}
        self._stats_lock = threading.Lock()

    def _count(self, name: str, n: int = 1) -> None:
        with self._stats_lock:
            self.stats[name] += n

    def cache_key(self, prompt: str, readout: str = "number") -> str:
        tag = SCHEME if readout == "number" else READOUT_TAGS[readout]
        return JudgeCache.key(self.spec, self.identity, tag, prompt)

    def score(self, prompts: Sequence[str], progress: Callable[[int], None] | None = None,
              readout: str = "number") -> list[float | None]:
        """Scores (0-100 or None) for judge prompts, in order; cached ones cost nothing.

        `readout` is ``number`` (the expected number 0-100) or ``yesno`` (100 * P(Yes) / (P(Yes) + P(No))).
        """
        if readout not in READOUT_TAGS:
            raise ValueError(f"readout must be one of {', '.join(READOUT_TAGS)}, got {readout!r}")
        results: dict[str, dict] = {}
        todo: list[str] = []
        copies = Counter(prompts)  # each distinct prompt is judged once
        for prompt in copies:
            hit = self.cache.get(self.cache_key(prompt, readout))
            if hit is None:
                todo.append(prompt)
            else:
                results[prompt] = hit
                self._count("cache_hits")
        advance = progress or (lambda n=1: None)
        advance(len(prompts) - sum(copies[p] for p in todo))
        lock = threading.Lock()

        def done(prompt: str, value: dict) -> None:
            # Called as each result arrives (from worker threads for API judges): commit it at once.
            self.cache.put(self.cache_key(prompt, readout), value)
            with lock:
                results[prompt] = value
                advance(copies[prompt])
            self._count("calls")

        if todo:
            (self._compute if readout == "number" else self._compute_yes_no)(todo, done)
        return [final_score(results[p]["expected"], results[p]["mass"], results[p]["refused"]) for p in prompts]

    def _compute(self, prompts: list[str], done: Callable[[str, dict], None]) -> None:
        raise NotImplementedError

    def _compute_yes_no(self, prompts: list[str], done: Callable[[str, dict], None]) -> None:
        """Yes/no readouts: ``done(prompt, scoring.yes_no_result(p_yes, p_no))`` for each prompt."""
        raise NotImplementedError(f"judge {self.spec} has no yes/no readout")

    def context_length(self) -> int | None:
        """The longest judge prompt (in the judge's tokens) this judge can read, when known (local judges)."""
        return None

    def too_long(self, prompt: str) -> bool:
        """True when `prompt` does not fit the judge's context: it is not judged (no score) instead of running
        the judge far past its context, for minutes and to no use."""
        return False

    def close(self) -> None:
        self.cache.close()


def _result(probs: Sequence[float], refused: bool) -> dict:
    expected, mass = expected_score(probs)
    return {"expected": expected, "mass": mass, "refused": bool(refused)}
