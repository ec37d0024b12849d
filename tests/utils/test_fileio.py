"""Atomic writes (diffusion_pl/utils/fileio.py): a full disk or an unwritable folder ends in one line naming the
file and leaves nothing half-written; temporary files of killed writers are removed by the next write."""

from __future__ import annotations

import errno
import os
import subprocess
import sys

import pytest

from diffusion_pl.utils import fileio
from diffusion_pl.utils.errors import WriteError, find_user_error, one_line
from diffusion_pl.utils.fileio import atomic_path, remove_stale_temporaries, writable_folder


def _dead_pid() -> int:
    """The PID of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_full_disk_names_the_file_and_leaves_the_old_one(tmp_path):
    target = tmp_path / "last.ckpt"
    target.write_bytes(b"previous checkpoint")
    with pytest.raises(WriteError) as info:
        with atomic_path(target, durable=True) as tmp, open(tmp, "wb") as f:
            f.write(b"half a checkpoint")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    message = one_line(info.value)
    assert str(target) in message and "free space" in message and "\n" not in str(info.value), message
    assert info.value.errno == errno.ENOSPC and isinstance(info.value, OSError)
    assert target.read_bytes() == b"previous checkpoint"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.ckpt"]  # no temporary file left


def test_an_error_reading_a_source_inside_the_block_is_not_called_a_write_error(tmp_path):
    source = tmp_path / "source.bin"
    with pytest.raises(PermissionError) as info:
        with atomic_path(tmp_path / "out.bin"):
            raise PermissionError(errno.EACCES, "Permission denied", str(source))
    assert not isinstance(info.value, WriteError)


def test_a_file_in_the_way_of_the_folder(tmp_path):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(WriteError, match=r"--out .*afile/sub cannot be written \(.*afile is a file\)"):
        writable_folder(tmp_path / "afile" / "sub", "--out")
    with pytest.raises(WriteError, match="afile/sub/x.ckpt cannot be written"):
        with atomic_path(tmp_path / "afile" / "sub" / "x.ckpt") as tmp:
            tmp.write_text("never")
    assert writable_folder(tmp_path / "new" / "deeper", "--out") == tmp_path / "new" / "deeper"
    assert not (tmp_path / "new").exists()  # checked, not created


@pytest.mark.skipif(os.name != "posix" or os.geteuid() == 0,
                    reason="root writes into read-only (0o500) folders: the permission check cannot bite")
def test_a_read_only_folder(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o500)
    try:
        with pytest.raises(WriteError, match="Permission denied"):
            writable_folder(folder / "out", "--out")
    finally:
        folder.chmod(0o700)


def test_an_os_error_of_the_machine_is_a_user_error():
    """What escapes the checks (a log file on a full disk): one line through run_command, not a traceback."""
    err = RuntimeError("wrapped")
    err.__cause__ = OSError(errno.ENOSPC, "No space left on device", "/runs/a/events.out")
    user = find_user_error(err)
    assert user is not None and "/runs/a/events.out" in one_line(user) and "free space" in one_line(user)
    assert find_user_error(OSError(errno.EIO, "Input/output error")) is None  # a broken disk stays a traceback


def test_the_next_write_removes_temporaries_of_killed_writers(tmp_path, monkeypatch):
    dead, alive = _dead_pid(), os.getppid()
    host, other = fileio._HOST, "0badc0de" if fileio._HOST != "0badc0de" else "0badc0df"
    names = {f".last.tmp-{dead}-{host}.ckpt": False,  # killed on this host: removed
             f".000004.tmp-{dead}.png": False,  # the name without a host of earlier versions: removed
             f".last.tmp-{alive}-{host}.ckpt": True,  # its writer still runs: kept
             f".last.tmp-{dead}-{other}.ckpt": True,  # written from another host: its PID says nothing here
             ".hidden-notes": True, "epoch=0-step=2.ckpt": True}
    for name in names:
        (tmp_path / name).write_bytes(b"partial")
    monkeypatch.setattr(fileio, "_swept", set())
    with atomic_path(tmp_path / "last.ckpt") as tmp:
        tmp.write_bytes(b"new")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["last.ckpt", *[n for n, kept in names.items()
                                                                                if kept]])
    assert remove_stale_temporaries(tmp_path) == []
