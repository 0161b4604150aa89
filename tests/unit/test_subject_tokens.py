"""Where the subject's last token is found when the tokenizer merges it with what follows."""
from __future__ import annotations

import pytest

from blue_plugin.errors import BLUERequestError
from blue_plugin.hparams import BLUEHyperParams
from blue_plugin.editing.requests import encode_prompt, prepare_requests


@pytest.fixture(scope="module")
def ws_tok():
    """Whitespace-split word-level tokenizer: punctuation stays glued to its word, so
    ``(APA-56)?`` is one token, as SmolLM2's BPE merges ``)?``."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = ["What", "is", "USS", "Leedstown", "(APA-56)?", "(APA-56)", "Rome", "Romeo?", "named", "after?"]
    tk = Tokenizer(models.WordLevel({w: i for i, w in enumerate(["<pad>", "<unk>"] + words)}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", unk_token="<unk>", eos_token="<pad>")


def _hp(fact_token="subject_last"):
    return BLUEHyperParams(layers=[1, 2], v_loss_layer=3, fact_token=fact_token, max_length=40)


def test_token_running_on_into_punctuation_is_the_subject_last_token(ws_tok):
    req = {"prompt": "What is USS Leedstown (APA-56)?", "subject": "USS Leedstown (APA-56)", "target_new": "Rome"}
    (r,) = prepare_requests(ws_tok, [req], _hp())
    ids, pos = encode_prompt(ws_tok, "", r, "subject_last")
    assert ws_tok.convert_ids_to_tokens(ids)[pos] == "(APA-56)?"
    ids, pos = encode_prompt(ws_tok, "", r, "subject_first")
    assert ws_tok.convert_ids_to_tokens(ids)[pos] == "USS"


def test_subject_cut_inside_a_word_is_still_refused(ws_tok):
    req = {"prompt": "What is Romeo? named after?", "subject": "Rome", "target_new": "Rome"}
    with pytest.raises(BLUERequestError, match=r"does not end on a token boundary.*'Romeo\?' runs on.*whole word"):
        prepare_requests(ws_tok, [req], _hp())
