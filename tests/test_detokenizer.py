"""Incremental detokenizer: UTF-8 split across tokens, stop strings split across tokens."""

from multiserve.engine.detokenizer import IncrementalDetokenizer


def _run(pieces: list[bytes], stop: list[str]) -> tuple[list[str], bool, str]:
    detok = IncrementalDetokenizer(stop)
    out: list[str] = []
    for piece in pieces:
        text, hit = detok.push(piece)
        out.append(text)
        if hit:
            return out, True, ""
    return out, False, detok.flush()


def test_multibyte_character_split_over_byte_tokens_is_never_emitted_half() -> None:
    euro = "€".encode()
    out, hit, rest = _run([b"a", euro[:1], euro[1:2], euro[2:], b"b"], [])
    assert not hit
    assert out == ["a", "", "", "€", "b"]
    assert all("\ufffd" not in piece for piece in out)
    assert rest == ""


def test_stop_string_split_over_tokens_never_leaks() -> None:
    out, hit, _ = _run([b"Hello ", b"ST", b"O", b"P tail"], ["STOP"])
    assert hit
    assert "".join(out) == "Hello "
    assert all("S" not in piece for piece in out)


def test_partial_stop_prefix_is_released_when_it_diverges() -> None:
    out, hit, rest = _run([b"ab", b"ST", b"x"], ["STOP"])
    assert not hit
    assert "".join(out) + rest == "abSTx"
    assert out == ["ab", "", "STx"]  # "ST" is held back until it diverges from "STOP"


def test_held_text_is_flushed_at_the_end() -> None:
    out, hit, rest = _run([b"abc", b"ST"], ["STOP"])
    assert not hit
    assert "".join(out) == "abc"
    assert rest == "ST"


def test_earliest_of_several_stops_wins() -> None:
    out, hit, _ = _run([b"one two three"], ["three", "two"])
    assert hit
    assert "".join(out) == "one "


def test_multibyte_stop_string() -> None:
    data = "x→y".encode()
    out, hit, _ = _run([data[:2], data[2:4], data[4:]], ["→"])
    assert hit
    assert "".join(out) == "x"


def test_dangling_partial_character_becomes_replacement_on_flush() -> None:
    out, _, rest = _run([b"a", "€".encode()[:2]], [])
    assert "".join(out) == "a"
    assert rest == "\ufffd"
