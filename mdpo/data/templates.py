"""Examples -> the text the tokenizer sees: one prompt text and two response texts (EOS is added later, as an id).

- ``raw``: no template; the prompt text, then the response text (plain and HH rows as they are in the file).
- ``tulu2``: the Tulu 2 format of open-instruct: ``<|system|>\\n{c}\\n``, ``<|user|>\\n{c}\\n`` and, for earlier
  assistant turns, ``<|assistant|>\\n{c}{eos}\\n``; the prompt ends with the generation prompt ``<|assistant|>\\n``
  and the response is ``{c}`` followed by EOS. Contents are stripped, as open-instruct does.
- ``tulu3``: the same turns as Tulu 3's tokenizer config writes them (Llama 3.1 based): the tokenizer's own EOS
  (``<|end_of_text|>`` for Tulu 3), prompt contents as they are (Tulu 3's template does not strip them), the
  tokenizer's BOS first (open-instruct's ``--add_bos``: the template writes none).
- ``tokenizer``: the tokenizer's own ``chat_template``; a string holding ``{{`` or ``{%`` is used as a Jinja chat
  template the same way. The response is what the conversation adds after the generation prompt, with a trailing
  EOS text removed (it is appended as an id, exactly once).
- ``auto``: ``raw`` for plain and HH rows (today's behaviour); for message rows the tokenizer's chat template when
  it has one, else the fallback its caller names: the model family's default template (`Family.default_template`;
  the data path knows no models), ``tulu2`` (the format of the Llama 2 based Tulu 2 models) where none is named.

Message templates strip the responses' surrounding whitespace ("\\n\\nAssistant: Hi" answers start with a space).
Only chat templates (``tokenizer`` or Jinja) render tools, tool messages, ``tool_calls`` and ``reasoning_content``: the
row's ``tools`` go to ``apply_chat_template(tools=...)`` with ``data.chat_template_kwargs``. With
``train_empty_think=False`` an empty ``<think></think>`` block that opens both responses (Qwen 3's template writes one
before every final answer) is moved to the end of the prompt, so it is conditioned on rather than trained.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

from mdpo.config.sections import TEMPLATES
from mdpo.data.formats import RANKED_FORMATS, Example, Message, RowError, prompt_messages, response_message
from mdpo.errors import DataError

MESSAGE_FORMATS = ("ultrafeedback", "conversational", "multi_turn", *RANKED_FORMATS)
EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
FALLBACK_TEMPLATE = "tulu2"  # what `auto` gives message rows without a chat template, unless the caller names one


@dataclass(frozen=True)
class ChatOptions:
    """What a chat template gets beside the messages, and where an empty think block goes."""

    kwargs: dict[str, Any] = field(default_factory=dict)  # data.chat_template_kwargs
    train_empty_think: bool = True


@dataclass(frozen=True)
class Rendered:
    prompt: str
    chosen: str
    rejected: str


def is_jinja(template: str) -> bool:
    return "{{" in template or "{%" in template


def resolve_template(template: str, fmt: str, tokenizer, fallback: str) -> str:
    """A concrete template for this format and tokenizer: 'raw', 'tulu2', 'tulu3', 'tokenizer' or a Jinja string;
    `auto` gives message rows whose tokenizer has no chat template the `fallback`."""
    if template == "auto":
        if fmt not in MESSAGE_FORMATS:
            return "raw"
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else fallback
    if template == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise DataError(
            f"data.template=tokenizer but the tokenizer '{tokenizer.name_or_path}' has no chat_template; "
            "use data.template=tulu2, tulu3, raw or a Jinja template string"
        )
    if template == "raw" and fmt in MESSAGE_FORMATS:
        raise DataError(
            f"data.template=raw needs text prompts but {fmt} rows hold messages; use tulu2, tulu3 or tokenizer"
        )
    if template not in TEMPLATES and not is_jinja(template):
        raise DataError(f"data.template={template!r} is not one of {', '.join(TEMPLATES)} or a Jinja template")
    return template


def owns_special_tokens(template: str) -> bool:
    """Chat templates write BOS themselves; raw and Tulu text gets the tokenizer's own special tokens."""
    return template not in ("raw", "tulu2", "tulu3")


def render(example: Example, template: str, tokenizer, options: ChatOptions = ChatOptions()) -> Rendered:
    """The prompt text and the two response texts (no EOS) for a resolved template."""
    chosen, rejected = response_message(example.chosen), response_message(example.rejected)
    if template == "raw":
        if not isinstance(example.prompt, str):
            raise RowError("template raw needs a text prompt")
        _text_only(example, chosen, rejected, template)
        return Rendered(example.prompt, chosen["content"], rejected["content"])
    chosen, rejected = _stripped(chosen), _stripped(rejected)
    messages = prompt_messages(example)
    if template in ("tulu2", "tulu3"):
        _text_only(example, chosen, rejected, template)
        prompt = tulu_prompt(messages, tokenizer.eos_token, strip=template == "tulu2")
        return Rendered(prompt, chosen["content"], rejected["content"])
    chat = _ChatTemplate(tokenizer, None if template == "tokenizer" else template, example.tools, options.kwargs)
    prompt = chat.apply(messages, generation_prompt=True)
    responses = []
    for response in (chosen, rejected):
        full = chat.apply([*messages, response])
        if not full.startswith(prompt):
            raise RowError("the chat template does not render the prompt as a prefix of prompt + response")
        responses.append(strip_eos_text(full[len(prompt) :], tokenizer.eos_token))
    if not options.train_empty_think:
        think = [EMPTY_THINK.match(response) for response in responses]
        if all(think) and think[0].group() == think[1].group():
            prompt += think[0].group()
            responses = [response[think[0].end() :] for response in responses]
    return Rendered(prompt, *responses)


def _stripped(message: Message) -> Message:
    return {**message, "content": message["content"].strip()}


def _text_only(example: Example, chosen: Message, rejected: Message, template: str) -> None:
    """Text formats carry no tools, tool messages, tool calls or reasoning: refuse them rather than drop them."""
    messages = [chosen, rejected] if isinstance(example.prompt, str) else [*example.prompt, chosen, rejected]
    extra = sorted({key for m in messages for key in m if key not in ("role", "content")})
    extra += ["tools"] * bool(example.tools) + ["a tool message"] * any(m["role"] == "tool" for m in messages)
    if extra:
        raise RowError(
            f"template {template} cannot render {', '.join(extra)}: use the tokenizer's chat template or a Jinja one"
        )


def tulu_prompt(messages: list[Message], eos_token: str, strip: bool = True) -> str:
    """The Tulu 2 (contents stripped) or Tulu 3 (`strip=False`) prompt text, ending with the generation prompt
    "<|assistant|>\\n"."""
    parts = []
    for message in messages:
        role, content = message["role"], message["content"].strip() if strip else message["content"]
        if role == "assistant":
            parts.append(f"<|assistant|>\n{content}{eos_token}\n")
        else:
            parts.append(f"<|{role}|>\n{content}\n")
    parts.append("<|assistant|>\n")
    return "".join(parts)


def strip_eos_text(response: str, eos_token: str | None) -> str:
    """Drop a rendered EOS (and whitespace after it) from a response's end: EOS is appended once, as an id."""
    stripped = response.rstrip()
    if eos_token and stripped.endswith(eos_token):
        return stripped[: -len(eos_token)]
    return response


@dataclass(frozen=True)
class _ChatTemplate:
    """apply_chat_template with a row's tools and the configured keyword arguments; its refusals are RowErrors."""

    tokenizer: Any
    template: str | None  # None: the tokenizer's own
    tools: tuple[Any, ...]
    kwargs: dict[str, Any]

    def apply(self, messages: list[Message], generation_prompt: bool = False) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                messages,
                chat_template=self.template,
                tools=list(self.tools) or None,
                tokenize=False,
                add_generation_prompt=generation_prompt,
                **self.kwargs,
            )
        except Exception as err:  # jinja raises its own types (e.g. raise_exception for role order)
            raise RowError(f"chat template: {' '.join(str(err).split())}") from None
