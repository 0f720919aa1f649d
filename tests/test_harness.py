"""The fault-injection harness itself (tests/faults.py): a fault test is only as good as the faults it injects."""

from __future__ import annotations

import errno
from pathlib import Path

import pytest

from tests import faults


def test_faultfs_fails_the_nth_write_under_its_prefix_partially_then_whole(faultfs: Path, tmp_path: Path) -> None:
    inside = tmp_path / "watched"
    inside.mkdir()
    done = faults.run_child("harness_probe", str(inside / "f"), str(tmp_path / "other"), prefix=inside)
    assert done.returncode == 0, done.stderr
    # The third write writes half its bytes (a short count), the fourth fails; the file outside is never touched.
    assert done.result["inside"] == [10, 10, 5, errno.ENOSPC, 10]
    assert done.result["outside"] == [10, 10, 10, 10, 10]
    assert (inside / "f").stat().st_size == 35
    assert (done.result["seen"], done.result["failures"], done.result["writes"]) == (5, 2, 5)


def test_faultfs_kills_the_child_at_the_chosen_write(faultfs: Path, tmp_path: Path) -> None:
    done = faults.run_child("harness_probe", str(tmp_path / "f"), str(tmp_path.parent / "x-unwatched"), False,
                            prefix=tmp_path, ops="write", nth=1, kill="after")
    assert done.killed
    assert done.result is None


def test_a_small_disk_fills_up_and_frees_again(small_disk: faults.SmallDisk) -> None:
    small_disk.fill(leave=0)
    with pytest.raises(OSError, match="No space left") as raised:
        (small_disk.path / "data").write_bytes(b"x" * 65536)
    assert raised.value.errno == errno.ENOSPC
    small_disk.free()
    (small_disk.path / "data").write_bytes(b"x" * 65536)
    assert (small_disk.path / "data").stat().st_size == 65536
