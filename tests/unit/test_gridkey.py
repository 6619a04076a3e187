import stat

import pytest

from bonjourgrid.gridkey import GridKey, GridKeyError, sign, verify


def test_key_file_round_trip_and_private(tmp_path):
    path = tmp_path / "sub" / "grid.key"
    key = GridKey.generate()
    key.write(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert GridKey.read(path) == key
    assert len(key.secret) == 32


def test_init_refuses_to_overwrite_unless_forced(tmp_path):
    path = tmp_path / "grid.key"
    GridKey.generate().write(path)
    with pytest.raises(GridKeyError, match="already exists"):
        GridKey.generate().write(path)
    new = GridKey.generate()
    new.write(path, overwrite=True)
    assert GridKey.read(path) == new


@pytest.mark.parametrize(
    ("content", "message"),
    [("", "not a BonjourGrid key"), ("bonjourgrid-key-v1 zz", "not hexadecimal"),
     ("bonjourgrid-key-v1 abcd", "has 2 bytes"), ("ssh-rsa AAAA", "not a BonjourGrid key")],
)
def test_bad_key_files_are_explained(tmp_path, content, message):
    path = tmp_path / "grid.key"
    path.write_text(content)
    with pytest.raises(GridKeyError, match=message):
        GridKey.read(path)


def test_missing_key_tells_what_to_do(tmp_path):
    with pytest.raises(GridKeyError, match="bonjourgrid init"):
        GridKey.read(tmp_path / "nope.key")


def test_purposes_are_separated_and_key_id_is_public():
    key = GridKey.generate()
    assert key.derive("txt") != key.derive("msg")
    assert key.key_id not in repr(key.secret.hex())
    assert key.secret.hex() not in repr(key)


def test_truncated_signatures_never_verify():
    k = b"k" * 32
    sig = sign(k, b"payload")
    assert verify(k, b"payload", sig)
    assert not verify(k, b"payload", sig[:1])
    assert not verify(k, b"payload", b"")
    assert not verify(k, b"payloaX", sig)
