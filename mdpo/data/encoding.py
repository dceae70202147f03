"""Rendered text -> token ids with an exact prompt/response boundary, then the length policy.

The prompt's ids must be a prefix of prompt+response's ids, or the masked prompt is not the prompt the model is
conditioned on. Each response is tokenized in context (prompt + response in one call) and the prompt's ids are
checked against the joint ids. Where the tokenizer merged across the boundary (a prompt ending in a space, or
text that joins into one piece), the response is re-tokenized on its own after a newline anchor, so the boundary is
stable, and the fix is counted ("boundary re-tokenized").

Special tokens follow the tokenizer: the ids it puts before text (BOS for Llama when its config says so) start
every prompt unless a chat template writes them itself; EOS is appended to each response exactly once.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from transformers import AutoTokenizer

from mdpo.data.templates import Rendered
from mdpo.errors import DataError

BOUNDARY_FIXED = "boundary re-tokenized"
_ANCHOR = "\n"


@dataclass(frozen=True)
class LengthLimits:
    max_length: int = 8192  # tokens of prompt + one response
    max_prompt_length: int | None = None  # None = only max_length limits the prompt
    prompt_truncation: str = "keep_end"  # keep_end | keep_start, for prompts over max_prompt_length
    over_length: str = "truncate"  # truncate | drop


@dataclass
class Encoded:
    """One pair's ids; `error` is set (and ids empty) when the row cannot be used."""

    prompt: list[int] = field(default_factory=list)
    chosen: list[int] = field(default_factory=list)
    rejected: list[int] = field(default_factory=list)
    events: list[str] = field(default_factory=list)
    error: str = ""


def load_tokenizer(path: str):
    """A HF tokenizer folder (pad falls back to EOS: batches are right-padded and the padding is masked)."""
    if not Path(path).exists():
        raise DataError(f"data.tokenizer: '{path}' does not exist")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.eos_token_id is None:
        raise DataError(f"data.tokenizer: '{path}' has no EOS token; responses must end with one")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token_id = tokenizer.eos_token_id
    return tokenizer


def special_prefix(tokenizer, bos: bool = False) -> list[int]:
    """The ids the tokenizer itself puts before any text (e.g. [BOS]); trailing ones (an added EOS) are not kept,
    since mdpo appends EOS to responses itself. `bos`: BOS first even when the tokenizer adds none itself (Llama 3
    tokenizers without a BOS post-processor; Tulu 3 trains with open-instruct's --add_bos)."""
    with_special = tokenizer("a")["input_ids"]
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    prefix = []
    for start in range(len(with_special) - len(plain) + 1):
        if with_special[start : start + len(plain)] == plain:
            prefix = list(with_special[:start])
            break
    if bos and tokenizer.bos_token_id is not None and tokenizer.bos_token_id not in prefix:
        prefix.insert(0, tokenizer.bos_token_id)
    return prefix


def encode_batch(tokenizer, prefix: Sequence[int], rendered: Sequence[Rendered]) -> list[Encoded]:
    """Token ids for rendered pairs, one tokenizer call for the batch; boundary fixes are counted per pair."""
    texts = [text for r in rendered for text in (r.prompt, r.prompt + r.chosen, r.prompt + r.rejected)]
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"] if texts else []
    eos = tokenizer.eos_token_id
    out = []
    for k, item in enumerate(rendered):
        prompt, with_chosen, with_rejected = ids[3 * k : 3 * k + 3]
        pair = Encoded(prompt=[*prefix, *prompt])
        if not pair.prompt:
            pair.error = "the prompt is empty and the tokenizer adds no BOS: nothing to condition on"
            out.append(pair)
            continue
        responses = []
        for joint, text in ((with_chosen, item.chosen), (with_rejected, item.rejected)):
            if len(joint) > len(prompt) and joint[: len(prompt)] == prompt:
                response = joint[len(prompt) :]
            else:
                pair.events.append(BOUNDARY_FIXED)
                response = continuation_ids(tokenizer, text)
            responses.append(response if response[-1:] == [eos] else [*response, eos])
        pair.chosen, pair.rejected = responses
        out.append(pair)
    return out


def continuation_ids(tokenizer, text: str) -> list[int]:
    """`text` tokenized as a continuation, not as the start of a document: after a newline anchor whose ids are
    then removed (SentencePiece would otherwise add its word-start "▁"); on its own if the anchor merges."""
    anchor = tokenizer(_ANCHOR, add_special_tokens=False)["input_ids"]
    ids = tokenizer(_ANCHOR + text, add_special_tokens=False)["input_ids"]
    if len(ids) > len(anchor) and ids[: len(anchor)] == anchor:
        return ids[len(anchor) :]
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def fit_lengths(pair: Encoded, limits: LengthLimits, keep_head: int) -> Encoded:
    """Apply max_prompt_length (prompt cut keeping its start or end, the first `keep_head` special ids always
    kept) and max_length (responses cut keeping their start), or drop the pair; every change is an event."""
    prompt, responses = pair.prompt, {"chosen": pair.chosen, "rejected": pair.rejected}
    events = list(pair.events)
    drop = limits.over_length == "drop"
    if limits.max_prompt_length is not None and len(prompt) > limits.max_prompt_length:
        if drop:
            return Encoded(events=[*events, "dropped: prompt > max_prompt_length"])
        prompt = truncate_prompt(prompt, limits.max_prompt_length, limits.prompt_truncation, keep_head)
        events.append("truncated: prompt > max_prompt_length")
    if len(prompt) >= limits.max_length:
        return Encoded(events=[*events, "dropped: prompt >= max_length"])
    room = limits.max_length - len(prompt)
    for key, ids in responses.items():
        if len(ids) > room:
            if drop:
                return Encoded(events=[*events, "dropped: over max_length"])
            responses[key] = ids[:room]
            events.append(f"truncated: {key} response")
    return Encoded(prompt, responses["chosen"], responses["rejected"], events)


def truncate_prompt(prompt: list[int], limit: int, mode: str, keep_head: int = 0) -> list[int]:
    """At most `limit` ids; keep_end keeps the last ones (the question nearest the answer) after the head."""
    if len(prompt) <= limit:
        return prompt
    if mode == "keep_start" or limit <= keep_head:
        return prompt[:limit]
    return prompt[:keep_head] + prompt[len(prompt) - (limit - keep_head) :]
