"""Judges: score an answer 0-100 for a trait and for coherence, from a judge LLM's logprobs.

A judge reads a rubric prompt (the trait's, or the shared coherence rubric) and
answers with a number; its score is the expected number under the judge's
probabilities p(k), k = 0..100. Trait scores can instead come from a yes/no
question (100 * P(Yes) / (P(Yes) + P(No))); ``scoring.SCHEMES`` lists the
schemes, and :func:`judge_answers` takes one. Every call is cached (``base``). One spec string picks the backend everywhere:

- ``local:<model>``  a transformers model on this machine (packaged short name, hub id or folder);
- ``openai:<model>`` any OpenAI-compatible server, via ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``
  (vLLM, llama.cpp server, Ollama, OpenAI);
- ``none``           no judge (:func:`make_judge` returns ``None``).

``anthropic:<model>`` is an author spec only (:mod:`personavec.authoring`); judges
need token logprobs, and :func:`parse_spec` rejects it.

Modules: ``scoring`` (prompts and the pure 0-100 math), ``base`` (spec, cache,
``Judge``), ``local`` (``LocalJudge``: exact p(k) from a trie of number tokens),
``openai_compatible`` (``OpenAIJudge``: p(k) from top_logprobs). Each module's
docstring gives its part of the scheme.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Sequence

from .base import DEFAULT_LOCAL_JUDGE, Judge, JudgeCache, JudgeSpec, default_cache_path, parse_spec
from .local import LocalJudge
from .openai_compatible import OpenAIJudge, openai_client, redact
from .scoring import (COHERENCE_RUBRIC, DEFAULT_SCHEME, MIN_MASS, NUMBERS, SCHEME, SCHEMES, YES_NO_SCHEME,
                      coherence_prompt, combine, enumerate_digit_probs, expected_score, fill_rubric, final_score,
                      get_scheme, scheme_prompts, score_from_probs, yes_no_result)

__all__ = [
    "COHERENCE_RUBRIC", "DEFAULT_LOCAL_JUDGE", "DEFAULT_SCHEME", "MIN_MASS", "NUMBERS", "SCHEME", "SCHEMES",
    "YES_NO_SCHEME", "Judge", "JudgeCache", "JudgeSpec", "LocalJudge", "OpenAIJudge", "coherence_prompt", "combine",
    "default_cache_path", "enumerate_digit_probs", "expected_score", "fill_rubric", "final_score", "get_scheme",
    "judge_answers", "judge_calls", "make_judge", "openai_client", "parse_spec", "redact", "scheme_prompts",
    "score_from_probs", "score_items", "yes_no_result",
]


def make_judge(spec: str, cache: JudgeCache | str | Path | None = None, *, dtype: str = "auto",
               trust_remote_code: bool = False, batch_size: int = 8, concurrency: int = 8,
               timeout: float = 60.0, max_retries: int = 5) -> Judge | None:
    """Build the judge a spec names; ``none`` gives None."""
    parsed = parse_spec(spec)
    if parsed.kind == "none":
        return None
    if parsed.kind == "openai":
        return OpenAIJudge(parsed.model, cache, concurrency=concurrency, timeout=timeout, max_retries=max_retries)
    from ..models import load_model

    model, tokenizer = load_model(parsed.model, dtype=dtype, trust_remote_code=trust_remote_code)
    return LocalJudge(model, tokenizer, spec=str(parsed), cache=cache, batch_size=batch_size)


def judge_calls(scheme: str = DEFAULT_SCHEME, coherence: bool = True) -> int:
    """Judge calls per item of :func:`judge_answers` (for progress bars)."""
    return len(get_scheme(scheme).readouts) + (1 if coherence else 0)


def score_items(judge: Judge, trait, items: Sequence[tuple[str, str]], scheme: str = DEFAULT_SCHEME,
                progress: Callable[[int], None] | None = None) -> list[float | None]:
    """Trait scores (0-100 or None) of (question, answer) pairs under `scheme` (no context check)."""
    readouts = get_scheme(scheme).readouts
    prompts = [scheme_prompts(scheme, trait, q, a) for q, a in items]
    per_readout = [judge.score([p[r] for p in prompts], progress=progress, readout=kind) if items else []
                   for r, kind in enumerate(readouts)]
    return [combine([scores[i] for scores in per_readout]) for i in range(len(items))]


def judge_answers(judge: Judge, trait, items: Sequence[tuple[str, str]], coherence: bool = True,
                  progress: Callable[[int], None] | None = None, scheme: str = DEFAULT_SCHEME) -> list[dict]:
    """Score (question, answer) pairs: ``[{"trait_score": float|None, "coherence": float|None}]``.

    `trait` is a :class:`personavec.traits.Trait` (its rubric, or its yes/no question for the yesno
    schemes) or None for coherence only. `scheme` picks how the trait score is read (``scoring.SCHEMES``);
    coherence is always the 0-100 rubric. `progress(n)` is called as judge calls finish
    (:func:`judge_calls` per item). An item whose judge prompt does not fit the judge's context is not
    judged: both scores are None and ``"skipped"`` says why.
    """
    readouts = get_scheme(scheme).readouts if trait is not None else ()
    trait_prompts = [scheme_prompts(scheme, trait, q, a) for q, a in items] if trait is not None else []
    coherence_prompts = [coherence_prompt(q, a) for q, a in items] if coherence else []
    per_item = [list(trait_prompts[i] if trait_prompts else []) + ([coherence_prompts[i]] if coherence else [])
                for i in range(len(items))]
    too_long = getattr(judge, "too_long", lambda prompt: False)  # judges written elsewhere may not have it
    skipped = {i for i, prompts in enumerate(per_item) if any(too_long(p) for p in prompts)}
    keep = [i for i in range(len(items)) if i not in skipped]
    if skipped and progress:
        progress(len(skipped) * len(per_item[0]))
    t_scores: dict[int, float | None] = {}
    if trait_prompts and keep:
        per_readout = [judge.score([trait_prompts[i][r] for i in keep], progress=progress, readout=kind)
                       for r, kind in enumerate(readouts)]
        t_scores = {i: combine([scores[j] for scores in per_readout]) for j, i in enumerate(keep)}
    c_scores: dict[int, float | None] = {}
    if coherence_prompts and keep:
        c_scores = dict(zip(keep, judge.score([coherence_prompts[i] for i in keep], progress=progress)))
    results = []
    for i in range(len(items)):
        result = {"trait_score": t_scores.get(i), "coherence": c_scores.get(i)}
        if i in skipped:
            result["skipped"] = f"longer than the judge's context ({judge.context_length()} tokens)"
        results.append(result)
    return results
