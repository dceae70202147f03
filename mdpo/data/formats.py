"""Row schemas -> one canonical `Example`: a prompt (text or messages) and the two response texts.

Every supported layout ends up in the same shape, so templates and tokenization have one input:

- ``ultrafeedback``: ``chosen``/``rejected`` are message lists ending with the assistant's answer; the prompt is
  their shared prefix (or, when they share nothing, the ``prompt`` string as one user turn).
- ``hh``: ``chosen``/``rejected`` are whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts and there is no
  prompt column; the prompt is their common prefix up to the last "\\n\\nAssistant:".
- ``plain``: ``prompt``, ``chosen`` and ``rejected`` strings.
- ``conversational``: a message-list prompt with string completions (or one-assistant-message lists, TRL style).

A row that cannot be used raises `RowError` with a short reason; the caller adds ``file:row``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import NamedTuple

ROLES = ("system", "user", "assistant")
HH_ASSISTANT = "\n\nAssistant:"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")

Message = dict[str, str]


class RowError(ValueError):
    """One row cannot be used; the message is the reason (no location)."""


class ColumnKeys(NamedTuple):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass(frozen=True)
class Example:
    """One preference pair before templating: `prompt` is text (plain, hh) or a message list (the others)."""

    prompt: str | tuple[Message, ...]
    chosen: str
    rejected: str


def detect_format(row: Mapping, keys: ColumnKeys) -> str:
    """Guess the schema from one row's value types (the first readable row of a data set decides for all)."""
    prompt, chosen = row.get(keys.prompt), row.get(keys.chosen)
    if isinstance(chosen, list):
        return "conversational" if isinstance(prompt, list) else "ultrafeedback"
    if isinstance(prompt, list):
        return "conversational"
    if prompt is None and isinstance(chosen, str):
        return "hh"
    return "plain"


def normalize(row: Mapping, fmt: str, keys: ColumnKeys) -> Example:
    """One row of a known format -> Example; raises RowError naming the first problem."""
    if fmt == "plain":
        example = Example(_string(row, keys.prompt), _string(row, keys.chosen), _string(row, keys.rejected))
    elif fmt == "hh":
        example = _from_hh(_string(row, keys.chosen), _string(row, keys.rejected), keys)
    elif fmt == "ultrafeedback":
        example = _from_message_lists(row, keys)
    elif fmt == "conversational":
        prompt = tuple(_messages(_present(row, keys.prompt), keys.prompt))
        if not prompt:
            raise RowError(f"'{keys.prompt}' has no messages")
        example = Example(prompt, _completion(row, keys.chosen), _completion(row, keys.rejected))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    for key, text in ((keys.chosen, example.chosen), (keys.rejected, example.rejected)):
        if not text.strip():
            raise RowError(f"'{key}' is empty")
    if example.chosen == example.rejected:
        raise RowError("chosen and rejected are identical")
    return example


def _present(row: Mapping, key: str) -> object:
    if key not in row or row[key] is None:
        raise RowError(f"missing column '{key}'")
    return row[key]


def _string(row: Mapping, key: str) -> str:
    value = _present(row, key)
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: object, key: str) -> list[Message]:
    """Validate a message list: dicts with a known role and string content (extra keys are ignored)."""
    if not isinstance(value, list):
        raise RowError(f"'{key}' must be a list of messages, got {type(value).__name__}")
    out = []
    for i, message in enumerate(value):
        if not isinstance(message, Mapping):
            raise RowError(f"'{key}'[{i}] must be a {{role, content}} object, got {type(message).__name__}")
        role, content = message.get("role"), message.get("content")
        if role not in ROLES:
            raise RowError(f"'{key}'[{i}]: role {role!r} is not system, user or assistant")
        if not isinstance(content, str):
            raise RowError(f"'{key}'[{i}]: content must be a string, got {type(content).__name__}")
        out.append({"role": role, "content": content})
    return out


def _from_message_lists(row: Mapping, keys: ColumnKeys) -> Example:
    chosen = _messages(_present(row, keys.chosen), keys.chosen)
    rejected = _messages(_present(row, keys.rejected), keys.rejected)
    for key, messages in ((keys.chosen, chosen), (keys.rejected, rejected)):
        if not messages or messages[-1]["role"] != "assistant":
            raise RowError(f"'{key}' must end with an assistant message")
    if chosen[:-1] != rejected[:-1]:
        raise RowError("prompt does not match between chosen and rejected")
    prompt = chosen[:-1]
    if not prompt:  # lists holding only the answers: the prompt column is the user turn
        text = row.get(keys.prompt)
        if not isinstance(text, str) or not text.strip():
            raise RowError(f"no prompt: chosen and rejected share no messages and '{keys.prompt}' is not a string")
        prompt = [{"role": "user", "content": text}]
    return Example(tuple(prompt), chosen[-1]["content"], rejected[-1]["content"])


def _completion(row: Mapping, key: str) -> str:
    """A string completion, or a list holding exactly one assistant message (TRL's conversational layout)."""
    value = _present(row, key)
    if isinstance(value, str):
        return value
    messages = _messages(value, key)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(f"'{key}' must be a string or one assistant message")
    return messages[0]["content"]


def split_hh(chosen: str, rejected: str) -> tuple[str, str, str] | None:
    """HH-RLHF transcripts -> (prompt, chosen, rejected): the prompt is their common prefix up to and including
    the last "\\n\\nAssistant:" inside it; None when there is no such shared prefix."""
    common = 0
    for a, b in zip(chosen, rejected):
        if a != b:
            break
        common += 1
    cut = chosen.rfind(HH_ASSISTANT, 0, common)
    if cut < 0:
        return None
    cut += len(HH_ASSISTANT)
    return chosen[:cut], chosen[cut:], rejected[cut:]


def _from_hh(chosen: str, rejected: str, keys: ColumnKeys) -> Example:
    if chosen == rejected:
        raise RowError("chosen and rejected are identical")
    split = split_hh(chosen, rejected)
    if split is None:
        raise RowError(f"missing column '{keys.prompt}' and no shared '\\n\\nAssistant:' prefix (HH-RLHF)")
    return Example(*split)


def hh_messages(prompt: str) -> list[Message]:
    """An HH prompt ("\\n\\nHuman: a\\n\\nAssistant: b ... \\n\\nAssistant:") -> messages, so that chat templates
    apply; the trailing "Assistant:" is the generation prompt and is dropped. Contents are stripped."""
    parts = _HH_TURN.split(prompt)
    if parts[0].strip():
        raise RowError("HH transcript does not start with '\\n\\nHuman:'")
    turns = [("user" if name == "Human" else "assistant", text.strip()) for name, text in zip(parts[1::2], parts[2::2])]
    if not turns or turns[-1] != ("assistant", ""):
        raise RowError("HH prompt does not end with '\\n\\nAssistant:'")
    return [{"role": role, "content": text} for role, text in turns[:-1]]


def prompt_messages(example: Example) -> list[Message]:
    """The prompt as messages: a text prompt is one user turn, unless it is an HH transcript ("\n\nHuman: ..."
    up to a final "\n\nAssistant:"), which is parsed into its turns."""
    if isinstance(example.prompt, str):
        if example.prompt.startswith("\n\nHuman:") and example.prompt.endswith(HH_ASSISTANT):
            return hh_messages(example.prompt)
        return [{"role": "user", "content": example.prompt}]
    return [dict(m) for m in example.prompt]
