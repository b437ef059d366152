"""The OpenAI-compatible judge: any chat-completions server with logprobs (vLLM, llama.cpp server, Ollama, OpenAI).

p(k) for an OpenAI-compatible server (top_logprobs is at most 20 on OpenAI;
servers return logprobs for each generated position). One request generates up
to 4 tokens at temperature 0 with ``top_logprobs=20``:

1. If any number token at the first position has two or more digits, the
   server's tokenizer has whole-number tokens (OpenAI's tiktoken, Llama-3): p(k)
   is the first position's probability of the token "k" (the paper's rule).
2. Otherwise digits are split. We enumerate numbers digit by digit with the
   conditionals P(next | digits so far). The greedy answer's positions give
   them for its own prefix for free. For every other leading digit d whose
   probability is at least 0.001 (and for "10", to get "100"), one follow-up
   request continues an assistant message prefilled with those digits
   (sent with ``continue_final_message`` for vLLM/SGLang; llama.cpp server
   prefills a trailing assistant message by default; servers ignore unknown
   fields) and reads its first position. Other prefixes are dropped (< 0.001
   of mass each). P(stop | prefix) = 1 - the top-20 mass of digit tokens.
   vLLM reports the end-of-turn token's position; OpenAI and some servers do
   not, so where the judge stopped we have no distribution and take P(stop) = 1
   (stop was the most likely token there).
   After two digits other than "10" we assume the judge stops unless the greedy
   path shows otherwise: a third digit would make a number above 100.
3. If the server rejects the prefilled follow-up (HTTP 400), or
   ``PERSONAVEC_OPENAI_PREFILL=0`` says it would start a new answer instead of
   continuing (check this for Ollama and other servers), we approximate: another
   leading digit d takes the greedy answer's continuation distribution at the
   same depth ("9" after a greedy "85" spreads like "8" did). That keeps each
   leading digit's mass in its own decade; it is exact when the greedy branch
   holds all the mass.

Yes/no readouts (the ``yesno`` schemes) take one request of one token with
``top_logprobs=20``: P(Yes) and P(No) are the summed probabilities of the first
position's top tokens that read "yes" / "no" in any case, with or without a
space (a variant outside the top 20 counts 0).

API calls run concurrently and are retried on 429, 5xx, timeouts and connection
errors by the openai SDK (exponential backoff from 0.5 s, capped at 8 s, with up
to 25% jitter; ``Retry-After`` is honoured).
The API key is never logged, cached or shown in an error.
"""

from __future__ import annotations

import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ..errors import PersonavecError
from .base import Judge, JudgeCache, _result
from .scoring import NUMBERS, _valid_prefix, enumerate_digit_probs, is_yes_no, yes_no_result


_KEYLIKE = re.compile(r"\b(sk|key|api)[-_][A-Za-z0-9_\-*.]{6,}", re.IGNORECASE)


def redact(text: str, secret: str | None) -> str:
    """Remove the API key, and anything that looks like part of a key, from a message."""
    if secret:
        text = text.replace(secret, "[redacted]")
        # Servers echo masked keys like "sk-abc1***wxyz": drop any long fragment of the key too.
        for size in (8, 6):
            for i in range(0, max(0, len(secret) - size + 1)):
                frag = secret[i: i + size]
                if frag.strip("*-_") and len(frag) == size:
                    text = text.replace(frag, "[redacted]")
    return _KEYLIKE.sub("[redacted]", text)


def openai_client(role: str, base_url: str | None, api_key: str | None, timeout: float, max_retries: int):
    """An OpenAI SDK client for `role` ("judge", "author"): `(client, secret to redact, server identity)`.

    The SDK retries 408/409/429/5xx, timeouts and connection errors with exponential backoff and jitter.
    """
    try:
        from openai import OpenAI
    except ImportError:
        raise PersonavecError(f"openai {role}s need the openai package: pip install openai") from None
    base_url = base_url or os.environ.get("OPENAI_BASE_URL") or None
    api_key = api_key or os.environ.get("OPENAI_API_KEY") or None
    if api_key is None:
        if base_url is None:
            raise PersonavecError(f"openai {role}: set OPENAI_API_KEY (and OPENAI_BASE_URL for vLLM, llama.cpp or Ollama)")
        api_key = "EMPTY"  # local servers usually need no key, but the SDK wants one
    client = OpenAI(api_key=api_key, base_url=base_url, timeout=timeout, max_retries=max_retries)
    return client, api_key, (base_url or "https://api.openai.com/v1").rstrip("/")


class OpenAIJudge(Judge):
    """Any OpenAI-compatible chat-completions server with logprobs (see the module docstring for the rule)."""

    def __init__(self, model: str, cache: JudgeCache | str | Path | None = None, *, base_url: str | None = None,
                 api_key: str | None = None, concurrency: int = 8, timeout: float = 60.0, max_retries: int = 5,
                 top_logprobs: int = 20, prefill: bool | None = None, min_prob: float = 1e-3):
        super().__init__(cache)
        self.model = model
        self.spec = f"openai:{model}"
        self.client, self._secret, self.identity = openai_client("judge", base_url, api_key, timeout, max_retries)
        self.concurrency, self.top_logprobs, self.min_prob = concurrency, top_logprobs, min_prob
        env = os.environ.get("PERSONAVEC_OPENAI_PREFILL")
        self.prefill = prefill if prefill is not None else (None if env is None else env not in ("0", "false", "no"))

    def _error(self, exc: Exception) -> PersonavecError:
        status = getattr(exc, "status_code", None)
        message = str(getattr(exc, "message", None) or exc).splitlines()[0] if str(exc) else type(exc).__name__
        what = f"HTTP {status}" if status else type(exc).__name__
        return PersonavecError(redact(f"judge {self.spec} at {self.identity}: {what}: {message}", self._secret))

    def _request(self, messages: list[dict], max_tokens: int, prefilled: bool):
        import openai

        extra = {"continue_final_message": True, "add_generation_prompt": False} if prefilled else None
        self._count("requests")
        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=messages, max_tokens=max_tokens, temperature=0, logprobs=True,
                top_logprobs=self.top_logprobs, extra_body=extra)
        except openai.BadRequestError as exc:
            if prefilled:
                raise _PrefillRejected() from exc
            raise self._error(exc) from None
        except openai.OpenAIError as exc:
            raise self._error(exc) from None
        choice = response.choices[0]
        positions = choice.logprobs.content if choice.logprobs is not None else None
        if positions is None or any(p.top_logprobs is None for p in positions):
            raise PersonavecError(f"judge {self.spec}: the server returned no logprobs; the judge needs logprobs=True "
                                  "with top_logprobs (vLLM, llama.cpp server, Ollama and OpenAI support it)")
        return choice.message.content or "", positions

    @staticmethod
    def _distribution(position) -> dict[str, float]:
        """Top-logprobs of one position as {stripped token text: probability} (" 8" and "8" add up)."""
        import math

        dist: dict[str, float] = {}
        for top in position.top_logprobs:
            text = top.token.strip()
            dist[text] = dist.get(text, 0.0) + math.exp(top.logprob)
        return dist

    def number_probs(self, prompt: str) -> tuple[list[float], bool]:
        messages = [{"role": "user", "content": prompt}]
        content, positions = self._request(messages, max_tokens=4, prefilled=False)
        refused = content.strip().upper().startswith("REF")
        if not positions:  # the judge ended at once: no number
            return [0.0] * 101, refused
        first = self._distribution(positions[0])
        if any(t.isdigit() and len(t) >= 2 for t in first):  # whole-number tokens: the paper's rule
            probs = [0.0] * 101
            for t, p in first.items():
                if t in NUMBERS:
                    probs[int(t)] += p
            return probs, refused

        # Split digits: conditionals along the greedy path come with the first request.
        observed: dict[str, dict[str, float]] = {"": first}
        prefix = ""
        for position, nxt in zip(positions, positions[1:]):
            token = position.token.strip()
            if not (token.isdigit() and _valid_prefix(prefix + token)):
                break
            prefix += token
            observed[prefix] = self._distribution(nxt)
        greedy = prefix

        def cond(prefix: str) -> dict[str, float] | None:
            if prefix in observed:
                return observed[prefix]
            if len(prefix) >= 3 or (len(prefix) == 2 and prefix != "10"):
                return None  # assume the judge stops: a third digit leaves 0..100
            if self.prefill is not False:
                try:
                    _, pos = self._request(messages + [{"role": "assistant", "content": prefix}], 1, prefilled=True)
                    # No position: the judge stopped at once and the server did not report the stop token.
                    observed[prefix] = self._distribution(pos[0]) if pos else {}
                    self.prefill = True
                    return observed[prefix]
                except _PrefillRejected:
                    self.prefill = False
            # Approximation: take the greedy answer's continuation at the same depth.
            same_depth = greedy[: len(prefix)]
            return observed.get(same_depth) if len(same_depth) == len(prefix) else None

        return enumerate_digit_probs(cond, self.min_prob), refused

    def yes_no_probs(self, prompt: str) -> tuple[float, float]:
        """(P(Yes), P(No)) at the first answer position, from its top logprobs."""
        import math

        _, positions = self._request([{"role": "user", "content": prompt}], max_tokens=1, prefilled=False)
        sums = {"yes": 0.0, "no": 0.0}
        for top in (positions[0].top_logprobs if positions else []):
            word = is_yes_no(top.token)
            if word:
                sums[word] += math.exp(top.logprob)
        return sums["yes"], sums["no"]

    def _compute_yes_no(self, prompts, done):
        self._pool(prompts, lambda prompt: done(prompt, yes_no_result(*self.yes_no_probs(prompt))))

    def _compute(self, prompts, done):
        def one(prompt: str) -> None:
            probs, refused = self.number_probs(prompt)
            done(prompt, _result(probs, refused))  # cached the moment it arrives

        self._pool(prompts, one)

    def _pool(self, prompts, one) -> None:
        pool = ThreadPoolExecutor(max_workers=max(1, self.concurrency))
        try:
            for future in [pool.submit(one, p) for p in prompts]:
                future.result()  # re-raises the first failure
        finally:
            # On a failure, queued calls are dropped; running ones finish and are cached.
            pool.shutdown(wait=True, cancel_futures=True)

    def close(self) -> None:
        self.client.close()
        super().close()


class _PrefillRejected(Exception):
    """The server refused a request ending in a prefilled assistant message."""
