"""Context prefixes must be real text (a wrong attention mask or a missing BOS token gives
strings like 'The--,-- and,-,.' or 'The-the-key-to-the-')."""
import copy

import pytest

from blue_plugin.editing.contexts import ContextPrefixes, generate_prefixes, looks_like_text
from tests.tiny import make_model


@pytest.mark.parametrize("garbled", ["The--,-- and,-,.", "--,-,.", "", "   ", "1234 5678."])
def test_garbled_strings_are_rejected(garbled):
    assert not looks_like_text(garbled)


@pytest.mark.parametrize("text", ["Therefore. The key to this riddle lies. ", "Because of the fact that we're so close to. "])
def test_real_text_is_accepted(text):
    assert looks_like_text(text)


def test_smollm2_prefixes_are_real_text_and_reproducible(smollm2):
    model, tok = smollm2
    a = generate_prefixes(model, tok, [[6, 3]], seed=0)
    b = generate_prefixes(model, tok, [[6, 3]], seed=0)
    assert a == b and a[0] == "" and len(a) == 4
    assert all(looks_like_text(p) and p.endswith(". ") for p in a[1:]), a
    assert all("{" not in p and "}" not in p for p in a)
    assert isinstance(a, ContextPrefixes) and a.groups == (1, 3)


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_prefixes_carry_their_template_groups(arch):
    """One group per [n_tokens, n_prefixes] with n_prefixes > 0, after the bare prompt's own."""
    model, tok = make_model(arch)
    a = generate_prefixes(model, tok, [[4, 2], [3, 0], [5, 1]], seed=0)
    assert isinstance(a, ContextPrefixes) and a[0] == "" and len(a) == 4
    assert a.groups == (1, 2, 1)
    assert a == generate_prefixes(model, tok, [[4, 2], [3, 0], [5, 1]], seed=0)
    b = copy.deepcopy(a)
    assert b == a and b.groups == a.groups and list(a) == list(b)
