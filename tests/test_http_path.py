"""The request path an http listener judges and forwards (sidecar/http1/path.py): one
normalized form, so that `/api/../admin` cannot pass a rule on `/api/*`."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sidecar.http1.path import _normalize_fully, is_normal, normalize


@pytest.mark.parametrize(("raw", "normal"), [
    (b"/", b"/"),
    (b"/api/items/42", b"/api/items/42"),
    (b"/api/items/", b"/api/items/"),  # a trailing slash stays
    (b"/api/../admin", b"/admin"),
    (b"/api/./admin", b"/api/admin"),
    (b"/api/v1/../../admin", b"/admin"),
    (b"/..", b"/"),  # never above the root
    (b"/../../etc/passwd", b"/etc/passwd"),
    (b"/a/b/..", b"/a/"),
    (b"/a/.", b"/a/"),
    (b"//admin", b"/admin"),  # empty segments merged, as nginx does
    (b"/api//admin///x", b"/api/admin/x"),
    (b"/.well-known/x", b"/.well-known/x"),  # a segment that only starts with a dot
    (b"/a..b/..c/...", b"/a..b/..c/..."),
])
def test_dot_segments_and_empty_ones(raw: bytes, normal: bytes) -> None:
    assert normalize(raw) == normal


@pytest.mark.parametrize(("raw", "normal"), [
    (b"/api/%2e%2e/admin", b"/admin"),  # encoded dots are dots: decoded before resolving
    (b"/api/%2E%2E/admin", b"/admin"),
    (b"/api/.%2e/admin", b"/admin"),
    (b"/%61dmin", b"/admin"),  # unreserved letters decoded
    (b"/~user/%7Euser", b"/~user/~user"),
    (b"/a%3ab", b"/a%3Ab"),  # reserved: kept encoded, hex uppercased
    (b"/a%25b", b"/a%25b"),  # an encoded % stays encoded (no second decoding)
    (b"/a%20b", b"/a%20b"),
])
def test_percent_encoding(raw: bytes, normal: bytes) -> None:
    assert normalize(raw) == normal


@pytest.mark.parametrize(("raw", "why"), [
    (b"/api%2F..%2Fadmin", "encoded slash"),
    (b"/api/%2f", "encoded slash"),
    (b"/api%5C..%5Cadmin", "encoded backslash"),
    (b"/api\\..\\admin", "backslash"),
    (b"/a%00", "encoded NUL"),
    (b"/a%zz", "two hex digits"),
    (b"/a%4", "two hex digits"),
    (b"/a%", "two hex digits"),
    (b"/public/..;/admin", "parameters"),
    (b"/public/.;x/admin", "parameters"),
    (b"/a#b", "fragment"),
    (b"/\xc3\xa9", "percent-encoded (0xc3)"),
    (b"/a b", "percent-encoded (0x20)"),
    (b"/a\"b", "percent-encoded (0x22)"),
])
def test_refused_shapes_say_why(raw: bytes, why: str) -> None:
    result = normalize(raw)
    assert isinstance(result, str)
    assert why in result


PATH_BYTES = st.lists(st.sampled_from(
    [b"a", b"B", b"0", b".", b"..", b"/", b"//", b"%2e", b"%2E", b"%41", b"%3a", b"%25", b";",
     b"~", b"-", b"%2f", b"\\", b"%"]), max_size=12).map(lambda parts: b"/" + b"".join(parts))


@given(PATH_BYTES)
def test_normalizing_twice_changes_nothing(raw: bytes) -> None:
    once = normalize(raw)
    if isinstance(once, bytes):
        assert normalize(once) == once


@given(PATH_BYTES)
def test_a_normal_path_has_no_dot_segment_and_no_empty_one(raw: bytes) -> None:
    once = normalize(raw)
    if isinstance(once, bytes):
        segments = once.split(b"/")[1:]
        assert b".." not in segments and b"." not in segments
        assert all(segments[:-1]), once  # only the last may be empty (a trailing slash)
        assert once.startswith(b"/")


# --- the quick test for a path that is normal already ------------------------------------

# Bytes a quick test could misjudge: dots and slashes next to each other, escapes, bytes
# outside the path characters, `;` parameters, non-ASCII.
TRICKY_PATHS = st.lists(st.sampled_from(
    [b"a", b".", b"..", b"/", b"//", b"%2e", b"%2f", b"%41", b"%", b";", b"\\", b"#", b"?",
     b" ", b"\xc3\xa9", b"\x80", b"\x00", b"~", b"*", b":", b"@"]), max_size=12).map(b"".join)


@given(TRICKY_PATHS, st.booleans())
def test_a_path_the_quick_test_passes_is_one_the_full_judgement_keeps(raw: bytes,
                                                                        slash: bool) -> None:
    path = b"/" + raw if slash else raw
    if is_normal(path):
        assert _normalize_fully(path) == path


@pytest.mark.parametrize(("raw", "normal"), [
    (b"/", True), (b"/api/items/42", True), (b"/a/b/", True), (b"/a;b=c/d~e", True),
    (b"/file.tar.gz", True), (b"/a//b", False), (b"//a", False), (b"/a/./b", False),
    (b"/a/../b", False), (b"/..", False), (b"/a/.", False), (b"/.well-known", False),
    (b"/a./b", False), (b"/a..b", False), (b"/a%41", False), (b"/a%", False),
    (b"/a\\b", False), (b"/a#b", False), (b"/a?b", False), (b"/a b", False),
    (b"/\xc3\xa9", False), (b"/\x80", False), (b"a/b", False), (b"*", False), (b"", False),
])
def test_the_quick_test_passes_plain_paths_only(raw: bytes, normal: bool) -> None:
    assert is_normal(raw) is normal
