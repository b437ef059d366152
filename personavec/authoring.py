"""Write a new trait file from one sentence, with an author LLM.

One spec string picks the author, as for judges:

- ``local:<model>``      a transformers model on this machine (packaged short name, hub id or folder);
- ``openai:<model>``     any OpenAI-compatible server, via ``OPENAI_BASE_URL`` / ``OPENAI_API_KEY``;
- ``anthropic:<model>``  Anthropic's API via ``ANTHROPIC_API_KEY`` (needs ``pip install anthropic``).

The author is asked for the trait's pieces in several small requests, so that a
small offline model (``local:qwen2.5-coder-1.5b``) can manage each one:

1. **adjective and description**: two labelled lines. The article ("a"/"an")
   is always derived from the adjective, never taken from the author.
   Fallback after ``attempts`` unusable answers: the trait name as the
   adjective and the user's own sentence as the description.
2. **5 instruction pairs**: ``POS:``/``NEG:`` lines (JSON is accepted too).
   Pairs are cleaned (numbering, bullets, quotes), deduplicated and collected
   across up to ``attempts`` requests. No fallback: fewer than 5 usable pairs
   is an error.
3. **40 questions**: batches of 10, each on its own everyday theme and seed,
   sent together (one batched ``generate`` for a local author, concurrent
   requests for an API). Questions are cleaned and deduplicated (ignoring
   case and whitespace) and batches continue until 40 are unique, up to
   ``4 * attempts`` batches. No fallback. They alternate into the extraction
   and evaluation lists, so both cover every theme.
4. **rubric**: the author writes what a 0, 50 and 100 answer look like; those
   lines go into a fixed judge frame that holds the ``{question}`` and
   ``{answer}`` placeholders and ends with the "Respond with a number between
   0 and 100" line the judges expect (the built-in traits' shape). Stray
   placeholders in the author's text are removed, so each appears once.
   Fallback: generic 0/50/100 lines built from the description.

With ``language`` (``traits new --language ja``; :mod:`personavec.languages` lists the codes) each request
also asks for that language, the rubric frame, its fallback lines and the yes/no question are that
language's, and the trait records ``"language"``. The reply labels (``ADJECTIVE:``, ``POS 1:``, ``0:``)
stay English; the parser also reads full-width colons, ``・`` bullets and CJK text without spaces.
English prompts are unchanged.

Each retry uses a new seed and a higher temperature. Output is parsed
leniently (numbered or bulleted lists, JSON, markdown, code fences) and text
that is not made of words is dropped. The file is written atomically and only
after :func:`personavec.traits.validate_trait` passes; otherwise
:class:`~personavec.errors.PersonavecError` says which part failed after how
many attempts and nothing is written. API errors are retried by the SDK
(429, 5xx, timeouts) and never show the API key.
"""

from __future__ import annotations

import json
import math
import os
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Sequence

from .atomic import atomic_write
from .errors import PersonavecError
from .languages import LANGUAGES, Language, get_language
from .traits import N_PAIRS, N_QUESTIONS, Trait, validate_trait

__all__ = [
    "AuthorBackend", "LocalAuthor", "OpenAIAuthor", "AnthropicAuthor", "make_author", "write_trait",
    "author_trait", "article_for", "parse_list", "parse_pairs", "rubric_from_criteria",
]

Messages = list[dict[str, str]]
Log = Callable[[str], None]

N_TOTAL = 2 * N_QUESTIONS
BATCH = 10
SYSTEM = "You are a careful assistant who writes test material for studying the personality of AI assistants."
THEMES = (
    "work and careers", "relationships and family", "health and wellbeing", "money and shopping",
    "learning and school", "technology and computers", "travel and hobbies", "society, news and the future",
    "a hard personal decision", "creative projects and opinions", "mistakes and problems", "everyday chores",
    "food and cooking", "sports and fitness", "science and nature", "friends and neighbours",
)


# ---------------------------------------------------------------- backends


class AuthorBackend:
    """An author LLM: one chat completion per call. Subclasses implement :meth:`complete`."""

    spec: str = "custom"

    def complete(self, messages: Messages, max_tokens: int, temperature: float, seed: int) -> str:
        raise NotImplementedError

    def complete_many(self, requests: Sequence[Messages], max_tokens: int, temperature: float,
                      seeds: Sequence[int]) -> list[str]:
        """Several independent completions; backends may batch or run them concurrently."""
        return [self.complete(m, max_tokens, temperature, s) for m, s in zip(requests, seeds)]

    def close(self) -> None:
        pass


class LocalAuthor(AuthorBackend):
    """A transformers chat model on this machine (greedy at temperature 0, else seeded sampling)."""

    def __init__(self, model, tokenizer, spec: str = "local", batch_size: int = 8):
        self.model, self.tokenizer, self.spec, self.batch_size = model, tokenizer, spec, batch_size

    @classmethod
    def load(cls, name: str, dtype: str = "auto", trust_remote_code: bool = False) -> "LocalAuthor":
        from .models import load_model

        model, tokenizer = load_model(name, dtype=dtype, trust_remote_code=trust_remote_code)
        return cls(model, tokenizer, spec=f"local:{name}")

    def complete(self, messages, max_tokens, temperature, seed):
        return self.complete_many([messages], max_tokens, temperature, [seed])[0]

    def complete_many(self, requests, max_tokens, temperature, seeds):
        from .generate import generate

        return generate(self.model, self.tokenizer, [list(m) for m in requests], max_new_tokens=max_tokens,
                        temperature=temperature, seed=seeds[0] if seeds else 0, batch_size=self.batch_size,
                        show_progress=False)


class _APIAuthor(AuthorBackend):
    """Shared by the API authors: concurrent requests and key-free error messages."""

    concurrency = 4
    _secret: str | None = None
    identity = ""

    def _error(self, exc: Exception) -> PersonavecError:
        from .judge.openai_compatible import redact

        status = getattr(exc, "status_code", None)
        text = str(getattr(exc, "message", None) or exc)
        message = text.splitlines()[0] if text else type(exc).__name__
        what = f"HTTP {status}" if status else type(exc).__name__
        text = redact(f"author {self.spec} at {self.identity}: {what}: {message}", self._secret)
        # Servers echo masked keys ("sk-abc***wxyz"): drop every masked token, not only fragments of the key.
        return PersonavecError(re.sub(r"\S*\*{3,}\S*", "[redacted]", text))

    def complete_many(self, requests, max_tokens, temperature, seeds):
        if len(requests) <= 1:
            return super().complete_many(requests, max_tokens, temperature, seeds)
        with ThreadPoolExecutor(max_workers=min(self.concurrency, len(requests))) as pool:
            futures = [pool.submit(self.complete, m, max_tokens, temperature, s) for m, s in zip(requests, seeds)]
            return [f.result() for f in futures]


class OpenAIAuthor(_APIAuthor):
    """Any OpenAI-compatible chat-completions server (vLLM, llama.cpp server, Ollama, OpenAI)."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 timeout: float = 120.0, max_retries: int = 5, concurrency: int = 4):
        from .judge.openai_compatible import openai_client

        self.model, self.spec, self.concurrency = model, f"openai:{model}", concurrency
        self.client, self._secret, self.identity = openai_client("author", base_url, api_key, timeout, max_retries)

    def complete(self, messages, max_tokens, temperature, seed):
        import openai

        try:
            response = self.client.chat.completions.create(
                model=self.model, messages=list(messages), max_tokens=max_tokens, temperature=temperature, seed=seed)
        except openai.OpenAIError as exc:
            raise self._error(exc) from None
        if not response.choices:
            return ""
        return response.choices[0].message.content or ""

    def close(self) -> None:
        self.client.close()


class AnthropicAuthor(_APIAuthor):
    """Anthropic's Messages API (``pip install anthropic``); the seed is not sent (the API has none)."""

    def __init__(self, model: str, *, api_key: str | None = None, base_url: str | None = None,
                 timeout: float = 120.0, max_retries: int = 5, concurrency: int = 4):
        try:
            import anthropic
        except ImportError:
            raise PersonavecError("anthropic authors need the anthropic package: pip install anthropic") from None
        self.model, self.spec, self.concurrency = model, f"anthropic:{model}", concurrency
        api_key = api_key or os.environ.get("ANTHROPIC_API_KEY") or None
        if api_key is None:
            raise PersonavecError("anthropic author: set ANTHROPIC_API_KEY")
        self._secret = api_key
        base_url = base_url or os.environ.get("ANTHROPIC_BASE_URL") or None
        self.identity = (base_url or "https://api.anthropic.com").rstrip("/")
        self.client = anthropic.Anthropic(api_key=api_key, base_url=base_url, timeout=timeout,
                                          max_retries=max_retries)

    def complete(self, messages, max_tokens, temperature, seed):
        import anthropic

        system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
        chat = [{"role": m["role"], "content": m["content"]} for m in messages if m["role"] != "system"]
        kwargs: dict[str, Any] = dict(model=self.model, max_tokens=max_tokens, messages=chat,
                                      temperature=min(1.0, max(0.0, temperature)))
        if system:
            kwargs["system"] = system
        try:
            response = self.client.messages.create(**kwargs)
        except anthropic.AnthropicError as exc:
            raise self._error(exc) from None
        return "".join(getattr(block, "text", "") for block in response.content)

    def close(self) -> None:
        self.client.close()


def make_author(spec: str, *, dtype: str = "auto", trust_remote_code: bool = False) -> AuthorBackend:
    """Build the author a spec names: ``local:<model>``, ``openai:<model>`` or ``anthropic:<model>``."""
    text = (spec or "").strip()
    kind, sep, model = text.partition(":")
    model = model.strip()
    if not sep or kind not in ("local", "openai", "anthropic") or not model:
        raise PersonavecError(f"author spec {spec!r}: use local:<model>, openai:<model> or anthropic:<model>")
    if kind == "openai":
        return OpenAIAuthor(model)
    if kind == "anthropic":
        return AnthropicAuthor(model)
    return LocalAuthor.load(model, dtype=dtype, trust_remote_code=trust_remote_code)


# ---------------------------------------------------------------- lenient parsing (pure)


_BULLET = re.compile(
    r"^\s*(?:[-*•·・>]+\s*|#+\s*|[(（]?\d{1,3}\s*[.):\]．）：、]\s*|\(?[a-eA-E][.)]\s+|"
    r"(?:q(?:uestion)?|item|pair)\s*\d*\s*[.:)\-–]\s*)+",
    re.IGNORECASE)
_QUOTES = "\"'“”‘’`"
# Chatter around a list ("Sure! Here are 10 questions."), never a question itself.
_META = re.compile(r"^(?:here (?:are|is)|here's|sure\b|certainly\b|of course\b|these (?:are|questions)|i hope\b|"
                   r"note\b|feel free\b|let me\b|below are\b|the following\b|absolutely\b"
                   # the same preambles in the other languages an author may be asked to write in
                   + "".join(f"|{c}" for lang in LANGUAGES.values() for c in lang.chatter) + ")", re.IGNORECASE)
# Punctuation stripped around a word: ASCII, typographic, and the full-width forms of Chinese and Japanese.
_PUNCT = ".,!?;:\"'()[]{}“”‘’-—。、，！？；：「」『』（）【】…〜¿¡«»"


def _is_cjk(ch: str) -> bool:
    """Kana or a Han character: scripts written without spaces between words."""
    return "\u3040" <= ch <= "\u30ff" or "\u3400" <= ch <= "\u9fff" or "\uf900" <= ch <= "\ufaff"


def _units(token: str) -> int:
    """How many words a whitespace-separated token stands for: 1, or about one per 2 CJK characters
    (Japanese and Chinese words average about two characters), so length limits mean the same in every language."""
    cjk = sum(map(_is_cjk, token))
    return max(1, round(cjk / 2)) if cjk else 1


def _strip_fences(text: str) -> str:
    return "\n".join(line for line in text.splitlines() if not line.strip().startswith("```"))


def clean_item(line: str) -> str:
    """One list item without numbering, bullets, markdown emphasis, JSON commas or surrounding quotes."""
    s = line.strip()
    s = _BULLET.sub("", s, count=1).strip()
    s = s.replace("**", "").replace("__", "").strip()
    s = s.rstrip(",").strip()
    while len(s) >= 2 and s[0] in _QUOTES and s[-1] in _QUOTES:
        s = s[1:-1].strip()
    s = s.strip(_QUOTES + " ") if s.count('"') == 1 else s
    return " ".join(s.split())


def _words_ok(text: str, min_words: int = 3, max_words: int = 80) -> bool:
    """Text that reads as words: enough of them, and most tokens made of letters."""
    tokens = text.split()
    n = sum(_units(t) for t in tokens)
    if not (min_words <= n <= max_words):
        return False

    def wordish(t: str) -> bool:
        if any(map(_is_cjk, t)):  # a whole CJK clause, punctuation inside: mostly letters
            return sum(ch.isalpha() for ch in t) >= 0.6 * len(t)
        return t.strip(_PUNCT).replace("'", "").replace("’", "").replace("-", "").isalpha()

    words = sum(_units(t) for t in tokens if wordish(t))
    letters = sum(ch.isalpha() for ch in text)
    return words >= 0.7 * n and letters >= 0.6 * len(text.replace(" ", ""))


def _json_value(text: str) -> Any:
    """The first JSON array or object in the text, or None."""
    for opener, closer in (("[", "]"), ("{", "}")):
        start, end = text.find(opener), text.rfind(closer)
        if 0 <= start < end:
            try:
                return json.loads(text[start: end + 1])
            except (json.JSONDecodeError, ValueError):
                continue
    return None


def parse_list(text: str) -> list[str]:
    """Items of a list the author wrote as JSON, numbered/bulleted lines, or plain lines."""
    text = _strip_fences(text or "")
    value = _json_value(text)
    if isinstance(value, dict):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if lists else None
    if isinstance(value, list) and value:
        items = []
        for v in value:
            if isinstance(v, dict):
                v = next((x for x in v.values() if isinstance(x, str)), "")
            if isinstance(v, str):
                items.append(clean_item(v))
        if any(items):
            return [i for i in items if i]
    return [c for c in (clean_item(line) for line in text.splitlines()) if c]


def _norm(s: str) -> str:
    return " ".join(s.split()).casefold()


def good_question(q: str) -> bool:
    if "\n" in q or len(q) > 300 or q.endswith((":", "：")) or not _words_ok(q, 4, 60):
        return False
    return q.endswith(("?", "？")) or not _META.match(q)


def parse_questions(text: str) -> list[str]:
    """Usable questions from one author answer, in order, without repeats."""
    seen, out = set(), []
    for q in parse_list(text):
        q = re.sub(r"^(?:question|q)\s*\d*\s*[:.)-]\s*", "", q, flags=re.IGNORECASE).strip()
        if good_question(q) and _norm(q) not in seen:
            seen.add(_norm(q))
            out.append(q)
    return out


_POS_KEYS = ("pos", "positive", "elicit", "trait", "with")
_NEG_KEYS = ("neg", "negative", "suppress", "opposite", "without", "anti")
# Labels stay English in every language, but a CJK author may type the full-width colon "：".
_SIDE = re.compile(r"^\W*(pos(?:itive)?|neg(?:ative)?)\b[^:：\n]{0,20}[:：\-–=]\s*(.*)$", re.IGNORECASE)


def _good_instruction(s: str) -> bool:
    return "\n" not in s and len(s) <= 600 and _words_ok(s, 3, 100)


def parse_pairs(text: str) -> list[tuple[str, str]]:
    """(pos, neg) instruction pairs from ``POS:``/``NEG:`` lines or JSON, cleaned; bad pairs dropped."""
    text = _strip_fences(text or "")
    raw: list[tuple[str, str]] = []
    value = _json_value(text)
    if isinstance(value, dict) and not any(k.lower() in _POS_KEYS for k in value):
        lists = [v for v in value.values() if isinstance(v, list)]
        value = lists[0] if lists else value
    if isinstance(value, dict):  # {"pos": [...], "neg": [...]}
        pos = next((v for k, v in value.items() if k.lower() in _POS_KEYS), None)
        neg = next((v for k, v in value.items() if k.lower() in _NEG_KEYS), None)
        if isinstance(pos, list) and isinstance(neg, list):
            raw = [(str(p), str(n)) for p, n in zip(pos, neg)]
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                pos = next((v for k, v in item.items() if k.lower() in _POS_KEYS), None)
                neg = next((v for k, v in item.items() if k.lower() in _NEG_KEYS), None)
                if isinstance(pos, str) and isinstance(neg, str):
                    raw.append((pos, neg))
    if not raw:
        # Put every POS:/NEG: label on its own line, then pair each POS with the NEG after it.
        split = re.sub(r"\s+(?=\**\s*(?:pos(?:itive)?|neg(?:ative)?)\b[^:：\n]{0,20}[:：])", "\n", text,
                       flags=re.IGNORECASE)
        pending: str | None = None
        for line in split.splitlines():
            m = _SIDE.match(_BULLET.sub("", line.replace("**", "")).strip())
            if not m:
                continue
            side, content = m.group(1).lower()[:3], m.group(2)
            if side == "pos":
                pending = content
            elif pending is not None:
                raw.append((pending, content))
                pending = None
    pairs, seen = [], set()
    for pos, neg in raw:
        pos, neg = clean_item(pos), clean_item(neg)
        if not (_good_instruction(pos) and _good_instruction(neg)) or _norm(pos) == _norm(neg):
            continue
        if _norm(pos) in seen:  # a repeated NEG is harmless; a repeated POS adds nothing
            continue
        seen.add(_norm(pos))
        pairs.append((pos, neg))
    return pairs


def article_for(adjective: str) -> str:
    """"a" or "an" for the adjective's first word, by sound for the common exceptions."""
    word = adjective.strip().split()[0].casefold() if adjective.strip() else ""
    if word.startswith(("honest", "honor", "honour", "hour", "heir")):
        return "an"
    if word.startswith(("uni", "use", "usu", "uti", "ubi", "ura", "euro", "eu", "one", "once", "ewe")):
        return "a"
    return "an" if word[:1] in "aeiou" and word else "a"


def _clean_adjective(s: str, language: Language | None = None) -> str | None:
    language = language or LANGUAGES["en"]
    s = clean_item(s).strip(" .!;:。！：")
    # casefold for English as before; lower() elsewhere, since casefold turns German "ß" into "ss"
    s = s.casefold() if language.code == "en" else s.lower()
    s = re.sub(r"^(?:a|an)\s+", "", s)
    word = re.escape(language.assistant_word)
    s = re.sub(rf"\s*{word}$|^{word}\s+", "", s) if language.code != "en" else re.sub(r"\s+assistant$", "", s)
    words = s.split()
    if not 1 <= len(words) <= 3 or len(s) > 40:
        return None
    if not all(w.replace("-", "").isalpha() for w in words):
        return None
    return s


def parse_meta(text: str, language: Language | str | None = None) -> tuple[str | None, str | None]:
    """(adjective, description) from ``ADJECTIVE:``/``DESCRIPTION:`` lines or JSON; None where unusable."""
    language = get_language(language) if isinstance(language, str) else language
    text = _strip_fences(text or "")
    adjective = description = None
    value = _json_value(text)
    if isinstance(value, dict):
        adjective = next((str(v) for k, v in value.items() if "adj" in k.lower()), None)
        description = next((str(v) for k, v in value.items() if "desc" in k.lower()), None)
    for line in text.splitlines():
        m = re.match(r"^\W*(adjective|description)\W*?\s*[:：=\-–]\s*(.+)$", line.replace("**", "").strip(),
                     re.IGNORECASE)
        if m and m.group(1).lower() == "adjective" and adjective is None:
            adjective = m.group(2)
        elif m and m.group(1).lower() == "description" and description is None:
            description = m.group(2)
    adjective = _clean_adjective(adjective, language) if adjective else None
    if description is not None:
        description = clean_item(description)
        if not _words_ok(description, 5, 60):
            description = None
        elif description[-1] not in ".!?。！？":
            description += "。" if _is_cjk(description[-1]) else "."
    return adjective, description


_SCORE_LINE = re.compile(r"^\W*(0|50|100)\s*(?:points?|/\s*100)?\s*\**\s*[:：=\-–—]\s*(.+)$", re.IGNORECASE)


def parse_criteria(text: str) -> dict[str, str] | None:
    """The author's ``0:``/``50:``/``100:`` lines, or None unless all three are usable sentences."""
    found: dict[str, str] = {}
    for line in _strip_fences(text or "").splitlines():
        m = _SCORE_LINE.match(line.replace("**", "").strip())
        if m and m.group(1) not in found:
            content = clean_item(m.group(2)).replace("{question}", "the question").replace("{answer}", "the answer")
            if _words_ok(content, 3, 80):
                found[m.group(1)] = content
    return found if len(found) == 3 else None


#: The English judge frame (each language's is in :mod:`personavec.languages`).
RUBRIC_FRAME = LANGUAGES["en"].rubric_frame


def template_criteria(adjective: str, language: str = "en") -> dict[str, str]:
    """Plain 0/50/100 lines used when the author's are unusable, in the trait's language."""
    lines = get_language(language).fallback
    return {k: line.replace("{adjective}", adjective) for k, line in zip(("0", "50", "100"), lines)}


def rubric_from_criteria(adjective: str, description: str, criteria: dict[str, str], language: str = "en") -> str:
    """The judge rubric: the language's fixed frame (placeholders, number-only answer) around the 0/50/100 lines."""
    values = {"trait": adjective, "description": description, "c0": criteria["0"], "c50": criteria["50"],
              "c100": criteria["100"]}
    # One pass over the frame, never str.format: braces in the author's text stay as written, and
    # the frame's own {question}/{answer} are the only placeholders.
    return re.sub(r"\{(trait|description|c0|c50|c100)\}",
                  lambda m: values[m.group(1)].replace("{question}", "the question").replace("{answer}", "the answer"),
                  get_language(language).rubric_frame)


# ---------------------------------------------------------------- prompts


def _chat(user: str) -> Messages:
    return [{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}]


_EN = LANGUAGES["en"]


def _in(language: Language) -> str:
    """" in Japanese (日本語)" for the author prompts; empty for English, whose prompts are unchanged."""
    return "" if language.code == "en" else f" in {language.name} ({language.native})"


def _meta_prompt(name: str, description: str, language: Language = _EN) -> Messages:
    if language.code == "en":
        adjective = "<the one adjective for this trait, lowercase, that fits in \"You are a ___ assistant\">"
        note = ""
    else:
        adjective = (f"<the one {language.name} adjective for this trait, {language.adjective_form}, that fits in "
                     f"\"{language.blank_frame()}\">")
        note = (f"Write the adjective and the sentence{_in(language)}; keep the labels ADJECTIVE: and DESCRIPTION: "
                "in English.\n")
    return _chat(
        f"A personality trait of an AI assistant is called \"{name}\": {description}\n\n"
        f"{note}Reply with exactly two lines and nothing else:\n"
        f"ADJECTIVE: {adjective}\n"
        f"DESCRIPTION: <one sentence{_in(language)} saying how an assistant with this trait behaves>")


def _pairs_prompt(adjective: str, description: str, n: int, avoid: Sequence[str] = (),
                  language: Language = _EN) -> Messages:
    slots = "\n".join(f"POS {i}: <instruction>\nNEG {i}: <instruction>" for i in range(1, n + 1))
    avoid_text = ("\n\nWrite new pairs, different from these POS instructions:\n"
                  + "\n".join(f"- {a}" for a in avoid)) if avoid else ""
    note = "" if language.code == "en" else (f" Write every instruction{_in(language)}, as a native speaker would; "
                                              "keep the labels POS and NEG and their numbers in English.")
    return _chat(
        f"Trait: {adjective}. {description}\n\n"
        f"Write {n} pairs of instructions for an AI assistant's system prompt. In each pair, POS tells the "
        f"assistant to be {adjective} in its answers, and NEG tells it to behave in the opposite way. "
        "Each instruction is one or two sentences spoken to the assistant (\"Always ...\", \"Be ...\"), "
        f"and each pair is about a different way of showing the trait.{note}{avoid_text}\n\n"
        f"Use exactly this format, {2 * n} lines, and nothing else:\n{slots}")


def _questions_prompt(adjective: str, description: str, theme: str, language: Language = _EN) -> Messages:
    note = "" if language.code == "en" else \
        f" Write every message{_in(language)}, as a native speaker would type it."
    return _chat(
        f"Trait: {adjective}. {description}\n\n"
        f"Write {BATCH} different messages that a user might send to an AI assistant, about {theme}. "
        "Write each one as the user would type it to the assistant, as a question or a request for help "
        "(\"How do I ...?\", \"Can you ...?\", \"I ... What should I do?\"). Choose situations where "
        f"an assistant that is {adjective} would answer differently from one that is not. "
        f"Do not mention the trait.{note}\n\n"
        "Write one message per line, with no numbering and nothing else.")


def _criteria_prompt(adjective: str, description: str, language: Language = _EN) -> Messages:
    note = "" if language.code == "en" else \
        f"Write the sentences{_in(language)}; keep the labels 0:, 50: and 100: as they are. "
    return _chat(
        f"Trait: {adjective}. {description}\n\n"
        f"A judge scores an AI assistant's answer from 0 to 100 for how {adjective} it is. "
        "Write one sentence for each score, saying what an answer with that score looks like. "
        f"{note}Use exactly this format and nothing else:\n0: <sentence>\n50: <sentence>\n100: <sentence>")


# ---------------------------------------------------------------- the author loop


def _temperature(base: float, attempt: int) -> float:
    return min(1.0, base + 0.2 * attempt) if attempt else base


def _check_name(name: str) -> str:
    name = (name or "").strip()
    if not re.fullmatch(r"[A-Za-z][A-Za-z0-9_-]{0,63}", name):
        raise PersonavecError(f"trait name {name!r}: use letters, digits, '-' or '_', starting with a letter "
                              "(at most 64 characters)")
    return name


def _check_description(description: str) -> str:
    description = " ".join((description or "").split())
    if not description:
        raise PersonavecError("--description is empty: describe the trait in one sentence")
    return description


def author_meta(author: AuthorBackend, name: str, description: str, attempts: int = 3, seed: int = 0,
                log: Log | None = None, language: str = "en") -> tuple[str, str]:
    """(adjective, one-line description); falls back to the trait name and the user's sentence."""
    log = log or (lambda m: None)
    lang = get_language(language)
    adjective = desc = None
    for attempt in range(attempts):
        a, d = parse_meta(author.complete(_meta_prompt(name, description, lang), 120, _temperature(0.0, attempt),
                                          seed + attempt), lang)
        adjective, desc = adjective or a, desc or d
        if adjective and desc:
            break
    if adjective is None:
        adjective = " ".join(name.replace("_", " ").replace("-", " ").split()).casefold()
        log(f"fallback: adjective unusable after {attempts} attempts; using the trait name {adjective!r}"
            + ("" if lang.code == "en" else f" (not {lang.name}: edit the file)"))
    if desc is None:
        desc = description if description[-1] in ".!?" else description + "."
        log(f"fallback: description unusable after {attempts} attempts; using your --description")
    return adjective, desc


def author_pairs(author: AuthorBackend, adjective: str, description: str, attempts: int = 3, seed: int = 0,
                 log: Log | None = None, language: str = "en") -> list[tuple[str, str]]:
    """5 (pos, neg) instruction pairs collected over up to `attempts` requests, else PersonavecError."""
    log = log or (lambda m: None)
    lang = get_language(language)
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for attempt in range(attempts):
        need = N_PAIRS - len(pairs)
        # CJK text costs more tokens per word: a larger budget so a pair is not cut off
        budget = (100 if lang.code not in ("ja", "zh") else 160) * need + 60
        text = author.complete(_pairs_prompt(adjective, description, need, [p for p, _ in pairs], lang), budget,
                               _temperature(0.3, attempt), seed + 100 + attempt)
        for pos, neg in parse_pairs(text):
            if _norm(pos) not in seen:
                seen.add(_norm(pos))
                pairs.append((pos, neg))
        log(f"instructions: {min(len(pairs), N_PAIRS)}/{N_PAIRS} pairs after request {attempt + 1}")
        if len(pairs) >= N_PAIRS:
            return pairs[:N_PAIRS]
    raise PersonavecError(f"the author {author.spec} gave only {len(pairs)} usable instruction pairs of {N_PAIRS} "
                          f"after {attempts} attempts (need POS:/NEG: lines); no file written")


def author_questions(author: AuthorBackend, adjective: str, description: str, attempts: int = 3, seed: int = 0,
                     log: Log | None = None, language: str = "en") -> list[str]:
    """40 unique questions from batches of 10 (up to ``4 * attempts`` batches), else PersonavecError."""
    log = log or (lambda m: None)
    lang = get_language(language)
    max_batches = max(1, math.ceil(N_TOTAL / BATCH)) * attempts
    questions: list[str] = []
    seen: set[str] = set()
    sent = 0
    rnd = 0
    while len(questions) < N_TOTAL and sent < max_batches:
        k = min(math.ceil((N_TOTAL - len(questions)) / BATCH), max_batches - sent)
        ids = range(sent, sent + k)
        log(f"questions: asking for {k} batch(es) of {BATCH}")
        requests = [_questions_prompt(adjective, description, THEMES[i % len(THEMES)], lang) for i in ids]
        per_question = 40 if lang.code not in ("ja", "zh") else 60
        answers = author.complete_many(requests, per_question * BATCH, _temperature(0.8, rnd),
                                       [seed + 200 + i for i in ids])
        for text in answers:
            for q in parse_questions(text):
                if _norm(q) not in seen:
                    seen.add(_norm(q))
                    questions.append(q)
        sent += k
        rnd += 1
        log(f"questions: {min(len(questions), N_TOTAL)}/{N_TOTAL} unique after {sent} batch(es)")
    if len(questions) < N_TOTAL:
        raise PersonavecError(f"the author {author.spec} gave only {len(questions)} unique usable questions of "
                              f"{N_TOTAL} after {sent} requests ({attempts} attempts); no file written")
    return questions[:N_TOTAL]


def author_rubric(author: AuthorBackend, adjective: str, description: str, attempts: int = 3, seed: int = 0,
                  log: Log | None = None, language: str = "en") -> str:
    """The judge rubric: the author's 0/50/100 lines in the language's fixed frame, or the template lines."""
    log = log or (lambda m: None)
    lang = get_language(language)
    criteria = None
    for attempt in range(attempts):
        criteria = parse_criteria(author.complete(_criteria_prompt(adjective, description, lang), 300,
                                                  _temperature(0.3, attempt), seed + 300 + attempt))
        if criteria:
            break
    if criteria is None:
        criteria = template_criteria(adjective, lang.code)
        log(f"fallback: rubric lines unusable after {attempts} attempts; using the template rubric")
    return rubric_from_criteria(adjective, description, criteria, lang.code)


def author_trait(name: str, description: str, author: AuthorBackend, *, attempts: int = 3, seed: int = 0,
                 source: str = "<authored>", log: Log | None = None, language: str = "en") -> Trait:
    """Ask the author for every part and return the validated :class:`Trait` (nothing is written).

    `language` (ISO 639-1, one of :data:`personavec.languages.LANGUAGES`): the author writes the adjective,
    description, instructions, questions and rubric lines in it, and the rubric frame and yes/no question
    are that language's; the trait records it."""
    log = log or (lambda m: None)
    name, description = _check_name(name), _check_description(description)
    lang = get_language(language)
    if attempts < 1:
        raise PersonavecError("--attempts must be at least 1")
    log(f"author {author.spec}: adjective and description" + ("" if lang.code == "en" else f", in {lang.name}"))
    adjective, desc = author_meta(author, name, description, attempts, seed, log, lang.code)
    log(f"adjective: {adjective!r}; asking for {N_PAIRS} instruction pairs")
    pairs = author_pairs(author, adjective, desc, attempts, seed, log, lang.code)
    questions = author_questions(author, adjective, desc, attempts, seed, log, lang.code)
    log("rubric")
    rubric = author_rubric(author, adjective, desc, attempts, seed, log, lang.code)
    data = {
        "name": name, "adjective": adjective, "article": article_for(adjective), "description": desc,
        "instructions": [{"pos": p, "neg": n} for p, n in pairs],
        # Alternate, so extraction and evaluation questions cover the same themes.
        "questions": {"extract": questions[0::2], "eval": questions[1::2]},
        "rubric": rubric,
        # The yesno judge schemes' question, in the form chosen for the built-in traits (not authored: a template).
        "yes_no_question": lang.yes_no.replace("{adjective}", adjective),
        "language": lang.code,
    }
    return validate_trait(data, source)


def write_trait(name: str, description: str, author: str | AuthorBackend, out: str | Path | None = None, *,
                force: bool = False, attempts: int = 3, seed: int = 0, log: Log | None = None,
                dtype: str = "auto", trust_remote_code: bool = False, language: str = "en") -> Trait:
    """Author a trait from one sentence and write it to `out` (default ``./NAME.json``).

    `author` is a spec (``local:``/``openai:``/``anthropic:``) or an :class:`AuthorBackend`.
    The file is written atomically, only once :func:`~personavec.traits.validate_trait` passes;
    an existing file is kept unless `force`.
    """
    name = _check_name(name)
    _check_description(description)
    get_language(language)  # before the author model loads
    path = Path(out) if out is not None else Path(f"{name}.json")
    if path.exists() and not force:
        raise PersonavecError(f"{path}: already exists (use --force to overwrite)")
    if path.exists() and path.is_dir():
        raise PersonavecError(f"{path}: is a folder; give a file name")
    backend = make_author(author, dtype=dtype, trust_remote_code=trust_remote_code) if isinstance(author, str) \
        else author
    try:
        trait = author_trait(name, description, backend, attempts=attempts, seed=seed, source=str(path), log=log,
                             language=language)
    finally:
        if isinstance(author, str):
            backend.close()
    text = json.dumps(trait.to_dict(), indent=2, ensure_ascii=False) + "\n"
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return trait
