"""Token conventions shared by editing, statistics and evaluation: the padding id and how a target
is tokenised after its prompt."""
from __future__ import annotations


def pad_token_id(tok) -> int:
    """The id used for padding: the pad token, else the eos token, else 0 (padding is always
    masked out, so any id works)."""
    for name in ("pad_token_id", "eos_token_id"):
        value = getattr(tok, name, None)
        if isinstance(value, int):
            return value
    return 0


def encode_target(tok, target: str) -> list[int]:
    """Target tokens as they follow a prompt: the tokenisation of ``" " + target``."""
    return tok(" " + target.strip(), add_special_tokens=False)["input_ids"]
