"""Context prefixes must be real text (a wrong attention mask or a missing BOS token gives
strings like 'The--,-- and,-,.' or 'The-the-key-to-the-')."""
import pytest

from blue_plugin.contexts import generate_prefixes, looks_like_text


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
