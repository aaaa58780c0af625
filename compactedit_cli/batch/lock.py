"""One batch per output folder at a time: a second run into the same folder refuses, naming the holder.

The lock is an advisory ``flock`` on ``OUT_DIR/.compactedit-batch.lock``, which holds the holder's pid for the
message. The kernel drops a ``flock`` when its process dies, ``kill -9`` included, so a stale lock file never blocks
a later run: whoever takes the lock simply writes their own pid into it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

from ..errors import OutputError

LOCK_NAME = ".compactedit-batch.lock"


@contextlib.contextmanager
def output_folder_lock(out_dir: Path, name: str = LOCK_NAME) -> Iterator[Path]:
    """Hold the output folder's lock for the block, or raise an OutputError if another batch holds it.

    Shards of one batch each take their own lock (``name``), since they edit disjoint items side by side.
    """
    path = out_dir / name
    fd = _take(path, out_dir)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        try:
            yield path
        finally:
            with contextlib.suppress(OSError):
                path.unlink()
    finally:
        os.close(fd)


def _take(path: Path, out_dir: Path) -> int:
    """An open, locked descriptor of the lock file that is still the one at ``path``.

    A holder that finishes removes the file; whoever locked that removed file meanwhile must try again on the new one.
    """
    while True:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o644)
        except OSError as exc:
            raise OutputError(f"cannot lock the output folder {out_dir}: {exc.strerror or exc}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(
                f"the output folder {out_dir} is in use by another compactedit batch (pid {holder})",
                hint="wait for it to finish, or use another output folder",
            ) from None
        try:
            current = path.lstat()
        except FileNotFoundError:
            current = None
        mine = os.fstat(fd)
        if current is not None and (current.st_dev, current.st_ino) == (mine.st_dev, mine.st_ino):
            return fd
        os.close(fd)
