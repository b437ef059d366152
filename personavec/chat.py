"""Chat JSONL files, chat templates, and prompt/response token spans.

A chat is `{"messages": [{"role": "system"|"user"|"assistant", "content": str}, ...]}`
plus any other fields, which personavec keeps and writes back. The last
assistant message is "the response"; everything before it is "the prompt".

Token spans (the rule, used everywhere):
- prompt tokens = the model's own chat template applied to the prompt messages
  with `add_generation_prompt=True`, tokenized without extra special tokens;
- response tokens = the tokens that the response text adds when
  `prompt_text + response` is tokenized as one string (never a string search).
- The end-of-turn token and anything the template writes after the assistant
  message (e.g. `<|im_end|>\\n`) are NOT part of the response: they are not the
  model's answer, and a model generating the answer has not seen them yet. Since
  attention is causal they cannot change the response activations either, so
  they are simply not fed.
- If joint tokenization merges characters across the prompt/response boundary
  (the prompt ids are then not a prefix of the joint ids), the response is
  tokenized on its own and appended: that is exactly what the model sees when it
  generates the answer itself.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

from .atomic import atomic_write
from .errors import PersonavecError, arg

ROLES = ("system", "user", "assistant")


@dataclass
class ChatRecord:
    """One line of a chat JSONL file: its messages, its other fields and where it came from."""

    messages: list[dict]
    fields: dict = field(default_factory=dict)
    where: str = ""  # "file:line", for error messages

    @property
    def has_response(self) -> bool:
        return bool(self.messages) and self.messages[-1]["role"] == "assistant"

    @property
    def prompt(self) -> list[dict]:
        return self.messages[:-1] if self.has_response else list(self.messages)

    @property
    def response(self) -> str:
        if not self.has_response:
            raise PersonavecError(f"{self.where}: the chat has no final assistant message")
        return self.messages[-1]["content"]

    def to_json(self) -> dict:
        return {**self.fields, "messages": self.messages}


def _validate_messages(messages, where: str) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise PersonavecError(f"{where}: \"messages\" must be a non-empty list")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            raise PersonavecError(f"{where}: messages[{i}] needs \"role\" and \"content\"")
        if message["role"] not in ROLES:
            raise PersonavecError(f"{where}: messages[{i}] has role {message['role']!r}; use one of {', '.join(ROLES)}")
        if not isinstance(message["content"], str):
            raise PersonavecError(f"{where}: messages[{i}].content must be a string")
    return messages


def check_readable_file(path: str | Path) -> Path:
    """`path` as a Path when it is a file that exists; a one-line error otherwise (missing, or a folder)."""
    path = Path(path)
    if not path.exists():
        raise PersonavecError(f"{path}: no such file")
    if path.is_dir():
        raise PersonavecError(f"{path}: is a folder, not a file")
    return path


def utf8_line(raw: bytes, where: str) -> str:
    """One line of a text file as str; bytes that are not UTF-8 are a one-line error naming the file and line."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise PersonavecError(f"{where}: not valid UTF-8 (byte 0x{raw[exc.start]:02x} at column {exc.start + 1}); "
                              "save the file as UTF-8") from None


def read_text(path: str | Path) -> str:
    """A whole UTF-8 text file (a leading BOM is dropped); missing files, folders and other encodings are
    one-line errors naming the file and line."""
    path = check_readable_file(path)
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise PersonavecError(f"{path}: cannot read it ({exc.strerror})") from None
    lines = raw.split(b"\n")
    text = "\n".join(utf8_line(line, f"{path}:{number}") for number, line in enumerate(lines, start=1))
    return text.removeprefix("\ufeff")


def parse_jsonl_line(raw: bytes, path, number) -> dict | None:
    """One line of a chat JSONL file as an object, None when blank; bad bytes, bad JSON or a non-object are a
    one-line error naming `path:number` (line 1 may start with a byte-order mark)."""
    line = utf8_line(raw, f"{path}:{number}")
    if number == 1:
        line = line.removeprefix("\ufeff")  # a byte-order mark, as some editors write
    if not line.strip():
        return None
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise PersonavecError(f"{path}:{number}: invalid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(obj, dict):
        raise PersonavecError(f"{path}:{number}: each line must be a JSON object")
    return obj


def iter_jsonl(path: str | Path) -> Iterator[tuple[int, dict]]:
    """Yield `(line_number, object)`; blank lines are skipped; bad JSON or bytes that are not UTF-8 are a one-line
    error naming the line."""
    path = check_readable_file(path)
    with open(path, "rb") as f:
        for number, raw in enumerate(f, start=1):
            obj = parse_jsonl_line(raw, path, number)
            if obj is not None:
                yield number, obj


def chat_record(obj: dict, where: str, require_response: bool = False) -> ChatRecord:
    """A row of a chat file (a JSONL object or a table row) as a ChatRecord; a bad one is a one-line error naming
    `where`."""
    if "messages" not in obj:
        raise PersonavecError(f"{where}: missing \"messages\"")
    messages = _validate_messages(obj["messages"], where)
    record = ChatRecord(messages=messages, fields={k: v for k, v in obj.items() if k != "messages"}, where=where)
    if require_response and not record.has_response:
        raise PersonavecError(f"{where}: the chat has no final assistant message (needed here as the response)")
    return record


def read_chats(path: str | Path, require_response: bool = False) -> list[ChatRecord]:
    """Read a chat file: JSON Lines, Parquet (`.parquet`) or a `datasets` folder (see `personavec.datasets_io`).
    With `require_response`, every chat must end with an assistant message.

    Returns a `ChatTable` (a list of `ChatRecord`) that also carries a Parquet/`datasets` input's column types, so
    `datasets_io.write_chats(..., like=records)` writes them back unchanged."""
    from .datasets_io import ChatTable, chat_format, iter_rows

    records = ChatTable()
    if chat_format(path) == "jsonl":
        rows = ((f"{path}:{number}", obj) for number, obj in iter_jsonl(path))
    else:
        records.format = chat_format(path)
        rows = iter_rows(path, records)
    for where, obj in rows:
        records.append(chat_record(obj, where, require_response))
    if not records:
        raise PersonavecError(f"{path}: no chats in the file")
    return records


def check_responses(records: list[ChatRecord], why: str = "the answer is averaged over its tokens") -> None:
    """Every chat must end with a non-empty assistant message; else a one-line error naming its file and line."""
    for record in records:
        check_response(record, why)


def check_response(record: ChatRecord, why: str = "the answer is averaged over its tokens") -> None:
    """`check_responses` of one chat."""
    if not record.has_response:
        raise PersonavecError(f"{record.where}: the chat has no final assistant message ({why})")
    if not record.response.strip():
        raise PersonavecError(f"{record.where}: the final assistant message is empty ({why}, so it needs at "
                              "least one token)")


# -- checks of one chat that commands make before a model runs (here, light: Ray's check tasks import no model code)

def check_screen_answer(record: ChatRecord) -> None:
    """An answer screen can score (after `read_chats(require_response=True)`): not empty."""
    if not record.response.strip():
        raise PersonavecError(f"{record.where}: the assistant answer is empty; screen needs at least one token")


def label_value(record: ChatRecord, name: str) -> int:
    """`screen --labels NAME`: the chat's 0/1 label."""
    value = record.fields.get(name)
    if value not in (0, 1):
        raise PersonavecError(f"{record.where}: label field {name!r} is {value!r}; it must be 0 or 1")
    return int(value)


def numeric_field(record: ChatRecord, path: str) -> float:
    """The number at a dotted field path (`judge.score`) of a chat line; a one-line error naming the line otherwise."""
    value = record.fields
    for part in path.split("."):
        if not isinstance(value, dict) or part not in value:
            raise PersonavecError(f"{record.where}: no field {path!r} (needed by {arg('scores')})")
        value = value[part]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PersonavecError(f"{record.where}: field {path!r} is {value!r}, not a number")
    return float(value)


def write_jsonl(path: str | Path, rows: Iterable[dict]) -> Path:
    """Write JSON lines atomically (see `atomic_write`)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")

    return atomic_write(path, write)


@dataclass
class EncodedChat:
    """Token ids of prompt (+ response) and where the response starts."""

    input_ids: list[int]
    prompt_len: int
    joint: bool = True  # False when the boundary fallback was used

    @property
    def response_len(self) -> int:
        return len(self.input_ids) - self.prompt_len


def prompt_text(tokenizer, messages: list[dict]) -> str:
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def encode_chat(tokenizer, messages: list[dict], with_response: bool = True) -> EncodedChat:
    """Tokenize a chat with the model's template; see the module docstring for the span rule."""
    has_response = bool(messages) and messages[-1]["role"] == "assistant"
    if with_response and not has_response:
        raise PersonavecError("the chat has no final assistant message")
    prompt_messages = messages[:-1] if has_response else messages
    text = prompt_text(tokenizer, prompt_messages)
    prompt_ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not with_response:
        return EncodedChat(prompt_ids, len(prompt_ids))
    response = messages[-1]["content"]
    joint_ids = tokenizer(text + response, add_special_tokens=False)["input_ids"]
    if joint_ids[: len(prompt_ids)] == prompt_ids:
        return EncodedChat(joint_ids, len(prompt_ids))
    response_ids = tokenizer(response, add_special_tokens=False)["input_ids"]
    return EncodedChat(prompt_ids + response_ids, len(prompt_ids), joint=False)


def user_chat(text: str, system: str | None = None) -> list[dict]:
    messages = [{"role": "system", "content": system}] if system else []
    return messages + [{"role": "user", "content": text}]
