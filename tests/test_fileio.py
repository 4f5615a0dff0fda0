"""The one atomic write: a crash mid-write leaves the previous file and no temporary behind."""

from __future__ import annotations

import pytest

from mamba_train.fileio import atomic_write, atomic_write_json


def test_a_crash_mid_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "sub" / "index.json"
    atomic_write_json(path, {"v": 1})

    def crashing(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write('{"v": 2, "trunc')
        raise KeyboardInterrupt("killed mid-write")

    with pytest.raises(KeyboardInterrupt):
        atomic_write(path, crashing)
    assert path.read_text() == '{\n  "v": 1\n}\n'
    assert [p.name for p in path.parent.iterdir()] == ["index.json"]


def test_replaces_in_place(tmp_path):
    path = tmp_path / "x.json"
    atomic_write_json(path, [1])
    atomic_write_json(path, [2])
    assert path.read_text().split() == ["[", "2", "]"]
