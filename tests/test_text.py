"""Head-side text handling with the model's real vocabulary: streaming detokenization and stops."""

from __future__ import annotations

from pathlib import Path

import pytest

from appliance.head.text import Detokenizer, StopMatcher, Tokenizer


@pytest.fixture(scope="module")
def tok(tiny_model: Path) -> Tokenizer:
    return Tokenizer(str(tiny_model))


def invalid_byte_token(tok: Tokenizer) -> int:
    """A byte-fallback token whose piece is a lone UTF-8 continuation byte (never valid)."""
    return next(i for i in range(4096) if tok.piece(i) == b"\x80")


def test_text_after_an_invalid_byte_streams_at_once(tok: Tokenizer) -> None:
    d = Detokenizer(tok)
    assert d.push(invalid_byte_token(tok)) == "\ufffd"
    out = [d.push(t) for t in tok.encode(" world and more", add_bos=False)]
    assert all(out), out  # every token's text comes out when it arrives, none is held back
    assert "".join(out) + d.flush() == " world and more"


def test_a_stop_string_after_an_invalid_byte_fires_before_the_end(tok: Tokenizer) -> None:
    d, m = Detokenizer(tok), StopMatcher(["STOP"])
    emitted = m.push(d.push(invalid_byte_token(tok)))
    hit_at = None
    for i, t in enumerate(tok.encode(" fine STOP and then a lot more text", add_bos=False)):
        emitted += m.push(d.push(t))
        if m.hit:
            hit_at = i
            break
    assert hit_at is not None and emitted == "\ufffd fine "


def test_a_multibyte_character_split_over_tokens_is_held_until_complete(tok: Tokenizer) -> None:
    d = Detokenizer(tok)
    pieces = [b"\xe2", b"\x82", b"\xac"]  # the euro sign, one byte per byte-fallback token
    ids = [next(i for i in range(4096) if tok.piece(i) == p) for p in pieces if any(tok.piece(i) == p for i in range(4096))]
    if len(ids) != 3:
        pytest.skip("this vocabulary has no single-byte tokens for these bytes")
    assert [d.push(i) for i in ids] == ["", "", "€"]


def test_flush_replaces_an_unfinished_character(tok: Tokenizer) -> None:
    d = Detokenizer(tok)
    ids = [i for i in range(4096) if tok.piece(i) == b"\xe2"]
    if not ids:
        pytest.skip("no single-byte token for 0xE2")
    assert d.push(ids[0]) == ""
    assert d.flush() == "\ufffd"
