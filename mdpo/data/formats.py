"""Row schemas -> canonical `Example`s: a prompt (text or messages) and two responses, one or several per row.

Every supported layout ends up in the same shape, so templates and tokenization have one input:

- ``ultrafeedback``: ``chosen``/``rejected`` are message lists ending with the assistant's answer; the prompt is
  their shared prefix (or, when they share nothing, the ``prompt`` string as one user turn).
- ``hh``: ``chosen``/``rejected`` are whole "\\n\\nHuman: ...\\n\\nAssistant: ..." transcripts and there is no
  prompt column; the prompt is their common prefix up to the last "\\n\\nAssistant:".
- ``plain``: ``prompt``, ``chosen`` and ``rejected`` strings.
- ``conversational``: a message-list prompt with string completions (or one-assistant-message lists, TRL style).
- ranked rows, several completions with scores, as published (`ranking` turns them into pairs):
  ``ultrafeedback_raw`` (``instruction`` + ``completions[]`` with ``response`` and a score), ``nectar`` (an HH
  ``prompt`` + ``answers[]`` with ``answer`` and ``rank``, 1 = best) and ``ranked`` (``prompt`` text or messages +
  ``completions`` + ``scores`` or ``ranks``).
- ``multi_turn``: a ``messages`` conversation whose assistant messages may carry ``rejected``, the alternative at
  that turn: one pair per such message, the conversation before it as the prompt.

Messages may be tool messages and carry ``tool_calls`` / ``reasoning_content``, and a row's ``tools`` column goes with
its pairs: the chat template renders them. A row that cannot be used raises `RowError` with a short reason; the
caller adds ``file:row``. A row that yields no pair raises a RowError starting with `NO_PAIR`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from mdpo.data.ranking import rank_pairs

ROLES = ("system", "user", "assistant", "tool")
PASSED_KEYS = ("reasoning_content", "tool_calls", "name", "tool_call_id")  # handed to the chat template as they are
RANKED_FORMATS = ("ultrafeedback_raw", "nectar", "ranked")
HH_ASSISTANT = "\n\nAssistant:"
NO_PAIR = "no pair left"
TIED = "tied: equal scores"
BELOW_GAP = "dropped: score gap < data.min_score_gap"
IDENTICAL = "dropped: identical completions"
_HH_TURN = re.compile(r"\n\n(Human|Assistant):")

Message = dict[str, Any]
Response = str | Message  # text, or an assistant message (its reasoning_content and tool_calls rendered too)


class RowError(ValueError):
    """One row cannot be used; the message is the reason (no location)."""


class ColumnKeys(NamedTuple):
    prompt: str = "prompt"
    chosen: str = "chosen"
    rejected: str = "rejected"


@dataclass(frozen=True)
class RankSettings:
    """How ranked rows become pairs (data.rank_pairs, min_score_gap, score_key; the seed of best_vs_random)."""

    rule: str = "all_pairs"
    min_score_gap: float = 0.0
    score_key: str = "overall_score"
    seed: int | None = None


@dataclass(frozen=True)
class Example:
    """One preference pair before templating: `prompt` is text (plain, hh) or a message list (the others); `tools`
    the row's tool definitions; `turn` its position among its row's preference turns (multi_turn rows)."""

    prompt: str | tuple[Message, ...]
    chosen: Response
    rejected: Response
    tools: tuple[Any, ...] = ()
    turn: int = 0


@dataclass(frozen=True)
class Ranked:
    """A ranked row read: the prompt, the completions and their scores (higher better)."""

    prompt: tuple[Message, ...]
    responses: tuple[Response, ...]
    scores: tuple[float, ...]


def detect_format(row: Mapping, keys: ColumnKeys) -> str:
    """Guess the schema from one row's columns and value types (the first readable row of a data set decides)."""
    if keys.chosen not in row:
        if isinstance(row.get("completions"), list):
            return "ultrafeedback_raw" if "instruction" in row else "ranked"
        if isinstance(row.get("answers"), list):
            return "nectar"
        if isinstance(row.get("messages"), list):
            return "multi_turn"
    prompt, chosen = row.get(keys.prompt), row.get(keys.chosen)
    if isinstance(chosen, list):
        return "conversational" if isinstance(prompt, list) else "ultrafeedback"
    if isinstance(prompt, list):
        return "conversational"
    if prompt is None and isinstance(chosen, str):
        return "hh"
    return "plain"


def expand(row: Mapping, fmt: str, keys: ColumnKeys, ranking: RankSettings) -> tuple[list[Example], list[str]]:
    """One row -> its pairs, in a fixed order, and what was left out of them (counted: ties, small gaps); raises
    RowError naming the first problem, or `NO_PAIR` when the row yields no pair."""
    tools = _tools(row)
    if fmt in RANKED_FORMATS:
        return ranked_examples(read_ranked(row, fmt, keys, ranking.score_key), tools, ranking)
    if fmt == "multi_turn":
        return turn_examples(row, tools), []
    return [dataclasses.replace(normalize(row, fmt, keys), tools=tools)], []


def normalize(row: Mapping, fmt: str, keys: ColumnKeys) -> Example:
    """One row of a single-pair format -> Example; raises RowError naming the first problem."""
    if fmt == "plain":
        example = Example(_string(row, keys.prompt), _string(row, keys.chosen), _string(row, keys.rejected))
    elif fmt == "hh":
        example = _from_hh(_string(row, keys.chosen), _string(row, keys.rejected), keys)
    elif fmt == "ultrafeedback":
        example = _from_message_lists(row, keys)
    elif fmt == "conversational":
        prompt = tuple(_messages(_present(row, keys.prompt), f"'{keys.prompt}'"))
        if not prompt:
            raise RowError(f"'{keys.prompt}' has no messages")
        example = Example(prompt, _completion(row, keys.chosen), _completion(row, keys.rejected))
    else:
        raise ValueError(f"unknown format {fmt!r}")
    _check_pair(example.chosen, example.rejected, f"'{keys.chosen}'", f"'{keys.rejected}'")
    return example


def response_message(response: Response) -> Message:
    """A response as the assistant message a chat template renders."""
    return {"role": "assistant", "content": response} if isinstance(response, str) else response


def _check_pair(
    chosen: Response,
    rejected: Response,
    chosen_key: str,
    rejected_key: str,
    identical: str = "chosen and rejected are identical",
) -> None:
    for key, response in ((chosen_key, chosen), (rejected_key, rejected)):
        if _is_empty(response):
            raise RowError(f"{key} is empty")
    if response_message(chosen) == response_message(rejected):
        raise RowError(identical)


def _is_empty(response: Response) -> bool:
    message = response_message(response)
    return not message["content"].strip() and not message.get("tool_calls")


def _present(row: Mapping, key: str) -> object:
    if key not in row or row[key] is None:
        raise RowError(f"missing column '{key}'")
    return row[key]


def _string(row: Mapping, key: str) -> str:
    value = _present(row, key)
    if not isinstance(value, str):
        raise RowError(f"'{key}' must be a string, got {type(value).__name__}")
    return value


def _messages(value: object, where: str) -> list[Message]:
    """Validate a message list (`where` names it: "'prompt'"): each a `_message`."""
    if not isinstance(value, list):
        raise RowError(f"{where} must be a list of messages, got {type(value).__name__}")
    return [_message(message, f"{where}[{i}]") for i, message in enumerate(value)]


def _message(message: object, where: str) -> Message:
    """A {role, content} object with a known role, string content (none for an assistant turn that only calls
    tools) and the `PASSED_KEYS` it has; other keys are ignored."""
    if not isinstance(message, Mapping):
        raise RowError(f"{where} must be a {{role, content}} object, got {type(message).__name__}")
    role, content = message.get("role"), message.get("content")
    if role not in ROLES:
        raise RowError(f"{where}: role {role!r} is not system, user, assistant or tool")
    if content is None and message.get("tool_calls"):
        content = ""
    if not isinstance(content, str):
        raise RowError(f"{where}: content must be a string, got {type(content).__name__}")
    out = {"role": role, "content": content}
    out.update((key, message[key]) for key in PASSED_KEYS if message.get(key) is not None)
    if not isinstance(out.get("reasoning_content", ""), str):
        raise RowError(f"{where}: reasoning_content must be a string")
    if not isinstance(out.get("tool_calls", []), list):
        raise RowError(f"{where}: tool_calls must be a list")
    return out


def _tools(row: Mapping) -> tuple[Any, ...]:
    """The row's tool definitions (column ``tools``; none when absent or null)."""
    tools = row.get("tools")
    if tools is None:
        return ()
    if not isinstance(tools, list) or not all(isinstance(tool, Mapping) for tool in tools):
        raise RowError(f"'tools' must be a list of tool definitions (objects), got {type(tools).__name__}")
    return tuple(tools)


def _from_message_lists(row: Mapping, keys: ColumnKeys) -> Example:
    chosen = _messages(_present(row, keys.chosen), f"'{keys.chosen}'")
    rejected = _messages(_present(row, keys.rejected), f"'{keys.rejected}'")
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
    return Example(tuple(prompt), chosen[-1], rejected[-1])


def _completion(row: Mapping, key: str) -> Response:
    return _response(_present(row, key), f"'{key}'")


def _response(value: object, where: str) -> Response:
    """A string completion, or a list holding exactly one assistant message (TRL's conversational layout)."""
    if isinstance(value, str):
        return value
    messages = _messages(value, where)
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise RowError(f"{where} must be a string or one assistant message")
    return messages[0]


# --------------------------------------------------------------------------- ranked rows


def read_ranked(row: Mapping, fmt: str, keys: ColumnKeys, score_key: str = "overall_score") -> Ranked:
    """A ranked row of `fmt` (one of RANKED_FORMATS) -> its prompt, completions and higher-better scores."""
    if fmt == "ultrafeedback_raw":
        prompt = [{"role": "user", "content": _string(row, "instruction")}]
        items = _objects(row, "completions")
        responses = [_text(item, "response", f"'completions'[{i}]") for i, item in enumerate(items)]
        scores = [_number(item.get(score_key), f"'completions'[{i}].{score_key}") for i, item in enumerate(items)]
    elif fmt == "nectar":
        prompt = hh_messages(_string(row, keys.prompt))
        items = _objects(row, "answers")
        responses = [_text(item, "answer", f"'answers'[{i}]") for i, item in enumerate(items)]
        scores = scores_from_ranks([item.get("rank") for item in items], "'answers'", "rank")
    elif fmt == "ranked":
        value = _present(row, keys.prompt)
        prompt = (
            [{"role": "user", "content": value}] if isinstance(value, str) else _messages(value, f"'{keys.prompt}'")
        )
        completions = _present(row, "completions")
        if not isinstance(completions, list):
            raise RowError(f"'completions' must be a list, got {type(completions).__name__}")
        responses = [_response(value, f"'completions'[{i}]") for i, value in enumerate(completions)]
        empty = [i for i, response in enumerate(responses) if _is_empty(response)]
        if empty:
            raise RowError(f"'completions'[{empty[0]}] is empty")
        scores = _ranked_scores(row, len(responses))
    else:
        raise ValueError(f"unknown ranked format {fmt!r}")
    if not prompt:
        raise RowError(f"'{keys.prompt}' has no messages")
    return Ranked(tuple(prompt), tuple(responses), tuple(scores))


def ranked_examples(ranked: Ranked, tools: tuple[Any, ...], ranking: RankSettings) -> tuple[list[Example], list[str]]:
    """The pairs `ranking.rule` makes of a ranked row, and the ties and drops (counted); RowError (`NO_PAIR`) when
    none is left. best_vs_random draws from a generator seeded by the seed and the row's content, so a row gets the
    same pair whatever its position, file or process."""
    rng = None
    if ranking.rule == "best_vs_random":
        rng = random.Random(json.dumps([ranking.seed, ranked.prompt, ranked.responses], sort_keys=True, default=str))
    made = rank_pairs(ranked.scores, ranking.rule, ranking.min_score_gap, rng)
    if made.no_pair:
        raise RowError(f"{NO_PAIR}: {made.no_pair}")
    events = [TIED] * made.ties + [BELOW_GAP] * made.below_gap
    examples = []
    for c, r in made.pairs:
        if response_message(ranked.responses[c]) == response_message(ranked.responses[r]):
            events.append(IDENTICAL)
        else:
            examples.append(Example(ranked.prompt, ranked.responses[c], ranked.responses[r], tools))
    if not examples:
        raise RowError(f"{NO_PAIR}: every pair's two completions are identical")
    if ranking.rule == "ranking" and len(examples) < len(made.pairs):
        raise RowError(f"{NO_PAIR}: two completions are identical (a ranking needs them distinct)")
    return examples, events


def scores_from_ranks(ranks: list[object], where: str, name: str) -> list[float]:
    """Ranks (1 = best), each of 1..n exactly once -> higher-better scores (the negated ranks)."""
    values = [_number(rank, f"{where}[{i}].{name}") for i, rank in enumerate(ranks)]
    repeated = [rank for rank, n in Counter(values).items() if n > 1]
    if repeated:
        raise RowError(f"{where}: {name} {repeated[0]:g} is repeated ({name}s must be 1..{len(values)}, each once)")
    missing = [k for k in range(1, len(values) + 1) if k not in values]
    if missing:
        raise RowError(f"{where}: {name} {missing[0]} is missing ({name}s must be 1..{len(values)}, each once)")
    return [-rank for rank in values]


def _ranked_scores(row: Mapping, count: int) -> list[float]:
    """The generic form's `scores` (higher better) or `ranks` (1 = best), one per completion."""
    if (row.get("scores") is None) == (row.get("ranks") is None):
        raise RowError("a ranked row needs 'scores' or 'ranks' (one of them)")
    key = "scores" if row.get("scores") is not None else "ranks"
    values = row[key]
    if not isinstance(values, list):
        raise RowError(f"'{key}' must be a list, got {type(values).__name__}")
    if len(values) != count:
        raise RowError(f"'{key}' has {len(values)} values for {count} completions")
    if key == "ranks":
        return scores_from_ranks(values, "'ranks'", "rank")
    return [_number(value, f"'scores'[{i}]") for i, value in enumerate(values)]


def _objects(row: Mapping, key: str) -> list[Mapping]:
    value = _present(row, key)
    if not isinstance(value, list) or not all(isinstance(item, Mapping) for item in value):
        raise RowError(f"'{key}' must be a list of objects")
    return value


def _text(item: Mapping, key: str, where: str) -> str:
    value = item.get(key)
    if not isinstance(value, str):
        raise RowError(f"{where}: '{key}' must be a string, got {type(value).__name__}")
    if not value.strip():
        raise RowError(f"{where}: '{key}' is empty")
    return value


def _number(value: object, where: str) -> float:
    if value is None:
        raise RowError(f"{where} is missing")
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RowError(f"{where} must be a number, got {value!r}"[:200])
    return float(value)


# --------------------------------------------------------------------------- per-turn preferences


def turn_examples(row: Mapping, tools: tuple[Any, ...] = ()) -> list[Example]:
    """A `messages` conversation -> one pair per assistant message carrying `rejected`: the conversation before it
    (earlier assistant turns as their chosen content) is the prompt, the message the chosen response, `rejected`
    (text, or an assistant message object) the rejected one; `turn` numbers them."""
    messages = _present(row, "messages")
    if not isinstance(messages, list):
        raise RowError(f"'messages' must be a list of messages, got {type(messages).__name__}")
    conversation: list[Message] = []
    examples = []
    for i, raw in enumerate(messages):
        where = f"'messages'[{i}]"
        message = _message(raw, where)
        alternative = raw.get("rejected")
        if alternative is not None:
            if message["role"] != "assistant":
                raise RowError(f"{where}: 'rejected' on a {message['role']} message (only assistant turns have one)")
            if not conversation:
                raise RowError(f"{where}: a preference turn with no conversation before it")
            rejected = _alternative(alternative, f"{where}.rejected")
            _check_pair(message, rejected, where, f"{where}.rejected", f"{where}: content and rejected are identical")
            examples.append(Example(tuple(conversation), message, rejected, tools, turn=len(examples)))
        conversation.append(message)
    if not examples:
        raise RowError(f"{NO_PAIR}: no assistant message in 'messages' carries 'rejected'")
    return examples


def _alternative(value: object, where: str) -> Response:
    """A turn's `rejected`: text, or an assistant message object (its role may be left out)."""
    if isinstance(value, str):
        return value
    if not isinstance(value, Mapping) or value.get("role", "assistant") != "assistant":
        raise RowError(f"{where} must be text or an assistant message")
    return _message({"role": "assistant", **value}, where)


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
