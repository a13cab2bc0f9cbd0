"""Single files written atomically."""

import os

import pytest

from slimformer.store.atomic import atomic_path, write_text_atomic


def test_atomic_path_cleans_up(tmp_path):
    target = tmp_path / "f.bin"
    with pytest.raises(ValueError), atomic_path(target) as tmp:
        tmp.write_bytes(b"half")
        raise ValueError
    assert list(tmp_path.iterdir()) == []


def test_write_text_atomic_replaces_whole_with_plain_file_mode(tmp_path):
    target = tmp_path / "a" / "f.txt"
    write_text_atomic(target, "old")
    write_text_atomic(target, "new ü")
    assert target.read_text(encoding="utf-8") == "new ü"
    assert [p.name for p in target.parent.iterdir()] == ["f.txt"]  # no temporary file left
    mask = os.umask(0)
    os.umask(mask)
    assert target.stat().st_mode & 0o777 == 0o666 & ~mask
