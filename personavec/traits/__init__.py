"""Trait artifacts: the instructions, questions and judge rubric for one trait.

A trait is stored as one JSON file. The seven built-ins live in
``personavec/traits/data/NAME.json``; a user's own trait is any file of the
same shape, passed by path wherever a trait name is accepted::

    {
      "name": "optimistic",
      "adjective": "optimistic",
      "article": "an",
      "description": "One line saying what the trait is.",
      "instructions": [
        {"pos": "Instruction that elicits the trait.", "neg": "Instruction that suppresses it."},
        ... exactly 5 pairs ...
      ],
      "questions": {
        "extract": ["... exactly 20 questions ..."],
        "eval":    ["... exactly 20 other questions ..."]
      },
      "rubric": "Judge prompt with {question} and {answer} placeholders ...",
      "yes_no_question": "Optional: one yes/no question for the yesno judge schemes.",
      "language": "Optional: the ISO 639-1 code the artifacts are written in (default \"en\")."
    }

Rules checked by :func:`validate_trait` (each failure is a one-line
:class:`~personavec.errors.PersonavecError` naming the file and field):

- every field above is present, of the right type, and no string is empty;
- ``article`` is ``"a"`` or ``"an"``;
- exactly 5 instruction pairs, 20 extraction and 20 evaluation questions;
- no question repeats, within or across the two lists (ignoring case and
  whitespace), so evaluation never scores questions the vector was built from;
- the rubric contains both ``{question}`` and ``{answer}``. They are replaced
  literally, so other braces in the rubric, question or answer are harmless;
- ``yes_no_question`` is optional (a trait without one can only be judged with the
  ``score100`` scheme); when present it is one line, with no placeholders: the
  judge reads it after the question and the answer (``judge.scoring.YES_NO_TEMPLATE``).

- ``language`` is optional and must be one of :data:`personavec.languages.LANGUAGES`
  (absent means ``"en"``, and ``to_dict`` leaves it out then, so English files are unchanged).

System prompts follow the paper: ``"You are a/an {adjective} assistant.
{instruction}"`` for a pos instruction and ``"You are a helpful assistant.
{instruction}"`` for a neg one. A trait in another language uses that language's
frames (``personavec.languages``, e.g. ``"あなたは{adjective}アシスタントです。"``); ``article`` is
then still required by the schema but not used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any, Literal

from personavec.errors import PersonavecError
from personavec.languages import get_language

__all__ = ["Trait", "list_traits", "load_trait", "validate_trait", "N_PAIRS", "N_QUESTIONS"]

N_PAIRS = 5
N_QUESTIONS = 20
_FIELDS = ("name", "adjective", "article", "description", "instructions", "questions", "rubric")


@dataclass(frozen=True)
class Trait:
    """One trait's artifacts; build it with :func:`load_trait` or :func:`validate_trait`."""

    name: str
    adjective: str
    article: str
    description: str
    instructions: tuple[tuple[str, str], ...]
    extract_questions: tuple[str, ...]
    eval_questions: tuple[str, ...]
    rubric: str
    source: str
    yes_no_question: str | None = None
    language: str = "en"

    def system_prompt(self, index: int, polarity: Literal["pos", "neg"]) -> str:
        """The system prompt for instruction pair ``index`` (0-4) on the ``pos`` or ``neg`` side."""
        pos, neg = self.instructions[index]
        frames = get_language(self.language)
        if polarity == "pos":
            return frames.pos_system(self.article, self.adjective, pos)
        if polarity == "neg":
            return frames.neg_system(neg)
        raise ValueError(f"polarity must be 'pos' or 'neg', got {polarity!r}")

    def rubric_prompt(self, question: str, answer: str) -> str:
        """The judge prompt for one answer.

        Placeholders are swapped in one pass over the rubric, so braces in the
        user's text, or a literal ``{answer}`` inside the question, stay as typed.
        """
        parts = self.rubric.split("{question}")
        return question.join(p.replace("{answer}", answer) for p in parts)

    def require_yes_no(self, scheme: str = "yesno") -> str:
        """The yes/no question, or a one-line error naming the trait file when it has none."""
        if not self.yes_no_question:
            raise PersonavecError(f'{_label(self.source)}: no "yes_no_question", which the {scheme} judge scheme '
                                  'needs; add one to the trait file or use the score100 scheme')
        return self.yes_no_question

    def to_dict(self) -> dict[str, Any]:
        """The trait in its JSON file format (``source`` is not part of the file)."""
        extra = {"yes_no_question": self.yes_no_question} if self.yes_no_question else {}
        if self.language != "en":  # English files (the built-ins) stay byte-identical, and so do cache keys
            extra["language"] = self.language
        return {
            "name": self.name,
            "adjective": self.adjective,
            "article": self.article,
            "description": self.description,
            "instructions": [{"pos": p, "neg": n} for p, n in self.instructions],
            "questions": {"extract": list(self.extract_questions), "eval": list(self.eval_questions)},
            "rubric": self.rubric,
            **extra,
        }


def _data_dir() -> Path:
    return Path(str(resources.files("personavec.traits") / "data"))


def list_traits() -> list[str]:
    """Names of the built-in traits, sorted."""
    return sorted(p.stem for p in _data_dir().glob("*.json"))


def load_trait(name_or_path: str | Path) -> Trait:
    """Load a built-in trait by name, or a user's trait JSON file by path."""
    text = str(name_or_path)
    path = Path(text)
    # A bare word is a built-in name; anything that looks like a file is a path,
    # so a typo in a path reports a missing file rather than an unknown trait.
    looks_like_path = path.suffix == ".json" or "/" in text or "\\" in text or path.is_file()
    if not looks_like_path:
        builtin = _data_dir() / f"{text}.json"
        if not builtin.is_file():
            raise PersonavecError(
                f"unknown trait {text!r}; built-in traits are: {', '.join(list_traits())} "
                "(or pass a path to a trait JSON file)"
            )
        return _load_file(builtin, f"builtin:{text}")
    if not path.is_file():
        raise PersonavecError(f"{text}: trait file not found")
    return _load_file(path, str(path))


def _load_file(path: Path, source: str) -> Trait:
    label = _label(source)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise PersonavecError(f"{label}: not valid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None
    except UnicodeDecodeError:
        raise PersonavecError(f"{label}: not valid UTF-8 text") from None
    except OSError as e:
        raise PersonavecError(f"{label}: cannot read file: {e.strerror}") from None
    if not isinstance(data, dict):
        raise PersonavecError(f"{label}: top level must be a JSON object, got {type(data).__name__}")
    return validate_trait(data, source)


def _label(source: str) -> str:
    """How errors name the file: the built-in's file name, or the user's path as given."""
    return source.removeprefix("builtin:") + ".json" if source.startswith("builtin:") else source


def _norm(q: str) -> str:
    return " ".join(q.split()).casefold()


def validate_trait(data: dict[str, Any], source: str) -> Trait:
    """Check a trait's JSON data and build a :class:`Trait`; ``source`` names it in errors."""
    label = _label(source)

    def fail(msg: str) -> PersonavecError:
        return PersonavecError(f"{label}: {msg}")

    def text(value: Any, field: str) -> str:
        if not isinstance(value, str):
            raise fail(f'"{field}" must be a string, got {type(value).__name__}')
        if not value.strip():
            raise fail(f'"{field}" is empty')
        return value.strip()

    for field in _FIELDS:
        if field not in data:
            raise fail(f'missing field "{field}"')

    name = text(data["name"], "name")
    adjective = text(data["adjective"], "adjective")
    article = text(data["article"], "article")
    if article not in ("a", "an"):
        raise fail(f'"article" must be "a" or "an", got {article!r}')
    description = text(data["description"], "description")
    if "\n" in description:
        raise fail('"description" must be one line')

    instructions = data["instructions"]
    if not isinstance(instructions, list):
        raise fail(f'"instructions" must be a list, got {type(instructions).__name__}')
    if len(instructions) != N_PAIRS:
        raise fail(f'"instructions" has {len(instructions)} pairs, need {N_PAIRS}')
    pairs: list[tuple[str, str]] = []
    for i, pair in enumerate(instructions):
        where = f"instructions[{i}]"
        if not isinstance(pair, dict):
            raise fail(f'"{where}" must be an object with "pos" and "neg", got {type(pair).__name__}')
        for side in ("pos", "neg"):
            if side not in pair:
                raise fail(f'missing field "{where}.{side}"')
        pairs.append((text(pair["pos"], f"{where}.pos"), text(pair["neg"], f"{where}.neg")))

    questions = data["questions"]
    if not isinstance(questions, dict):
        raise fail(f'"questions" must be an object with "extract" and "eval", got {type(questions).__name__}')
    lists: dict[str, tuple[str, ...]] = {}
    seen: dict[str, str] = {}
    for split in ("extract", "eval"):
        field = f"questions.{split}"
        if split not in questions:
            raise fail(f'missing field "{field}"')
        qs = questions[split]
        if not isinstance(qs, list):
            raise fail(f'"{field}" must be a list, got {type(qs).__name__}')
        if len(qs) != N_QUESTIONS:
            raise fail(f'"{field}" has {len(qs)} questions, need {N_QUESTIONS}')
        cleaned = tuple(text(q, f"{field}[{i}]") for i, q in enumerate(qs))
        for i, q in enumerate(cleaned):
            key = _norm(q)
            if key in seen:
                raise fail(f'"{field}[{i}]" repeats {seen[key]}: {q!r}')
            seen[key] = f'"{field}[{i}]"'
        lists[split] = cleaned

    rubric = text(data["rubric"], "rubric")
    for placeholder in ("{question}", "{answer}"):
        if placeholder not in rubric:
            raise fail(f'"rubric" lacks the {placeholder} placeholder')

    yes_no = None
    if data.get("yes_no_question") is not None:
        yes_no = text(data["yes_no_question"], "yes_no_question")
        if "\n" in yes_no:
            raise fail('"yes_no_question" must be one line')
        for placeholder in ("{question}", "{answer}"):
            if placeholder in yes_no:
                raise fail(f'"yes_no_question" must not contain {placeholder}: the judge reads it after the answer')

    language = "en"
    if data.get("language") is not None:
        if not isinstance(data["language"], str):
            raise fail(f'"language" must be a string, got {type(data["language"]).__name__}')
        language = get_language(data["language"], f'{label}: "language" is {data["language"]!r}').code

    return Trait(
        language=language,
        yes_no_question=yes_no,
        name=name,
        adjective=adjective,
        article=article,
        description=description,
        instructions=tuple(pairs),
        extract_questions=lists["extract"],
        eval_questions=lists["eval"],
        rubric=rubric,
        source=source,
    )
