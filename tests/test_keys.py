"""The key ring: sealing, opening, lookup hashes, the chain MAC, and how a bad key file is refused."""

from __future__ import annotations

import base64
import os

import pytest

from gateway.store.keys import KEYS_ENV, KeyRing, KeyRingError, add_key, is_sealed, new_key_file


def ring(tmp_path, name="herald.key"):
    path = new_key_file(tmp_path / name)
    return path, KeyRing.load(path, environ={})


def test_sealed_value_opens_and_hides_the_plaintext(tmp_path):
    _, keys = ring(tmp_path)
    sealed = keys.seal(b"PID|1||MRN123||DOE^JANE||19500101", b"messages.raw:1")
    assert is_sealed(sealed)
    assert b"DOE" not in sealed and b"19500101" not in sealed
    assert keys.open(sealed, b"messages.raw:1") == b"PID|1||MRN123||DOE^JANE||19500101"


def test_a_sealed_value_moved_to_another_row_does_not_open(tmp_path):
    _, keys = ring(tmp_path)
    sealed = keys.seal(b"secret", b"messages.raw:1")
    with pytest.raises(KeyRingError, match="does not open"):
        keys.open(sealed, b"messages.raw:2")


def test_an_altered_value_does_not_open(tmp_path):
    _, keys = ring(tmp_path)
    sealed = bytearray(keys.seal(b"secret", b"c"))
    sealed[-1] ^= 1
    with pytest.raises(KeyRingError, match="altered"):
        keys.open(bytes(sealed), b"c")


def test_plaintext_from_before_encryption_passes_through(tmp_path):
    _, keys = ring(tmp_path)
    assert keys.open(b"MSH|^~\\&|A", b"c") == b"MSH|^~\\&|A"
    assert keys.open_text("plain", b"c") == "plain"


def test_rotation_seals_with_the_new_key_and_opens_the_old(tmp_path):
    path, keys = ring(tmp_path)
    old = keys.seal(b"old", b"c")
    assert add_key(path) == "k2"
    rotated = KeyRing.load(path, environ={})
    assert rotated.current_id == "k2"
    assert rotated.key_of(rotated.seal(b"new", b"c")) == "k2"
    assert rotated.key_of(old) == "k1"
    assert rotated.open(old, b"c") == b"old"
    # Lookups and the chain stay the same across a rotation (they use the first key).
    assert rotated.lookup("MRN123") == keys.lookup("MRN123")
    assert rotated.chain_mac(b"", b"row") == keys.chain_mac(b"", b"row")


def test_a_key_the_ring_lacks_is_named(tmp_path):
    _, keys = ring(tmp_path)
    _, other = ring(tmp_path, "other.key")
    with pytest.raises(KeyRingError, match="does not open"):
        other.open(keys.seal(b"x", b"c"), b"c")
    lone = KeyRing([("k9", os.urandom(32))], "test")
    with pytest.raises(KeyRingError, match="'k1', which the key ring"):
        lone.open(keys.seal(b"x", b"c"), b"c")


def test_lookup_hashes_are_keyed(tmp_path):
    _, a = ring(tmp_path, "a.key")
    _, b = ring(tmp_path, "b.key")
    assert a.lookup("MRN123") == a.lookup("MRN123")
    assert a.lookup("MRN123") != b.lookup("MRN123")
    assert a.lookup("MRN123") != a.lookup("MRN124")


def test_key_file_is_private_and_never_overwritten(tmp_path):
    path, _ = ring(tmp_path)
    assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(KeyRingError, match="never overwrites"):
        new_key_file(path)


def test_a_key_file_others_can_read_is_refused(tmp_path):
    path, _ = ring(tmp_path)
    path.chmod(0o644)
    with pytest.raises(KeyRingError, match="readable by others"):
        KeyRing.load(path, environ={})


def test_missing_key_file_says_how_to_make_one(tmp_path):
    with pytest.raises(KeyRingError, match="herald keys init"):
        KeyRing.load(tmp_path / "none.key", environ={})


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("k1", "expected '<key id> <base64 key>'"),
        ("k1 not-base64!", "not base64"),
        ("k1 " + base64.b64encode(b"short").decode(), "32 bytes"),
        ("k/1 " + base64.b64encode(bytes(32)).decode(), "key id"),
        (f"k1 {base64.b64encode(bytes(32)).decode()}; k1 {base64.b64encode(bytes(32)).decode()}", "twice"),
        ("# only a comment", "no keys"),
    ],
)
def test_bad_key_text_is_refused_with_the_reason(text, message):
    with pytest.raises(KeyRingError, match=message):
        KeyRing.from_text(text, "test")


def test_the_environment_wins_over_the_file(tmp_path):
    path, from_file = ring(tmp_path)
    env_key = base64.b64encode(os.urandom(32)).decode()
    from_env = KeyRing.load(path, environ={KEYS_ENV: f"e1 {env_key}"})
    assert from_env.ids == ("e1",)
    assert from_env.lookup("x") != from_file.lookup("x")


def test_disabled_ring_stores_plaintext():
    keys = KeyRing.disabled()
    assert keys.seal(b"plain", b"c") == b"plain"
    assert keys.seal_text("plain", b"c") == "plain"
    assert keys.lookup("x") == KeyRing.disabled().lookup("x")
