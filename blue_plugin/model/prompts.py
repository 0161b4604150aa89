"""Prompts in the tokenizer's chat template (``use_chat_template``, for instruct models).

EasyEdit's ``use_chat_template`` (its WISE and LoRA editing, its ``test_prediction_acc`` evaluation)
puts a prompt into the chat template as one user message, with the generation prompt (the
assistant's turn opened), and the answer follows as ``" " + answer``. :func:`chat_span` does the
same and also says where the message sits in the resulting text, so that the editing engine finds
the subject's tokens inside the wrapped prompt; :func:`format_prompt` is the evaluation's view.

The text returned is the one the package tokenises as every prompt, with the tokenizer's default
special tokens. A template that writes the BOS token itself (Llama 3) would then give it twice, so
the BOS text is left out of the returned text when the tokenizer adds a BOS of its own: the ids are
those of ``apply_chat_template(..., tokenize=True)``.
"""
from __future__ import annotations

from typing import Any, Sequence

from ..errors import BLUEConfigError

#: Stands for the message while the template is rendered once to find where a message goes.
MARK = "\ue000blue-message\ue001"


def has_chat_template(tok: Any) -> bool:
    """Whether ``tok`` has a chat template (``tok.chat_template`` set)."""
    return bool(getattr(tok, "chat_template", None))


def _render(tok: Any, content: str) -> str:
    if not has_chat_template(tok):
        raise BLUEConfigError(
            f"use_chat_template: true needs a tokenizer with a chat template, and {type(tok).__name__} has none "
            "(tok.chat_template is not set); use the model's instruct tokenizer or set use_chat_template: false."
        )
    return tok.apply_chat_template([{"role": "user", "content": content}], tokenize=False, add_generation_prompt=True)


def _own_bos(tok: Any) -> str | None:
    """The BOS token text when the tokenizer puts the BOS id in front of every text itself."""
    bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
    if not bos or bos_id is None:
        return None
    return bos if list(tok("")["input_ids"])[:1] == [bos_id] else None


def chat_span(tok: Any, content: str) -> tuple[str, int]:
    """``content`` as the one user message of ``tok``'s chat template, followed by the generation
    prompt, and the offset of the message in that text: character ``i`` of ``content`` is character
    ``offset + i`` of the text.

    A template that trims the message (Llama 3's) is allowed; one that changes it otherwise, or
    that does not put it in exactly once, raises :class:`~blue_plugin.errors.BLUEConfigError`.
    """
    text = _render(tok, content)
    marked = _render(tok, MARK)
    if marked.count(MARK) != 1:
        raise BLUEConfigError(f"the chat template of {type(tok).__name__} does not put the user message in exactly once.")
    head, tail = marked.split(MARK)
    lead = 0
    if text != head + content + tail:
        if text != head + content.strip() + tail:
            raise BLUEConfigError(
                f"the chat template of {type(tok).__name__} changes the user message {content!r}; the subject cannot "
                "be found in the wrapped prompt (use_chat_template needs a template that writes the message as it is)."
            )
        lead = len(content) - len(content.lstrip())
    offset = len(head) - lead
    bos = _own_bos(tok)
    if bos and text.startswith(bos):
        text, offset = text[len(bos):], offset - len(bos)
    return text, offset


def chat_prompt(tok: Any, content: str) -> str:
    """The text of :func:`chat_span`: ``content`` wrapped in the chat template."""
    return chat_span(tok, content)[0]


def format_prompt(tok: Any, prompt: str, chat_template: bool = False) -> str:
    """``prompt`` as the model is scored on it: unchanged, or with ``chat_template`` wrapped by
    :func:`chat_prompt`."""
    if chat_template is False:
        return prompt
    if chat_template is not True:
        raise ValueError(f"chat_template must be True or False, got {chat_template!r}")
    return chat_prompt(tok, prompt)


def format_prompts(tok: Any, prompts: Sequence[str], chat_template: bool = False) -> list[str]:
    """:func:`format_prompt` of each prompt."""
    return [format_prompt(tok, p, chat_template) for p in prompts]
