"""Files read only from inside a root directory, whatever symbolic links say.

The adapter store and the ``--allowed-lora-roots`` are trust boundaries: a link inside them that
resolves elsewhere (``adapter_model.safetensors -> /etc/shadow``, an adapter directory linked to another
tenant's volume) must not make the server read there. Two checks, because a link can be swapped in
between them: :func:`escaping_link` when listing (so such an adapter is not offered at all), and
:func:`open_confined` when opening, which checks the file *actually opened* - through its descriptor -
so nothing swapped in after the listing is followed.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path


class PathEscapeError(OSError):
    """A path resolves outside the root it must stay in, or is not a regular file."""


def is_inside(path: Path, root: Path) -> bool:
    """Whether ``path`` (resolved, symlinks followed) is ``root`` or below it; ``root`` must be resolved."""
    real = Path(os.path.realpath(path))
    return real == root or real.is_relative_to(root)


def escaping_link(directory: Path, root: Path) -> Path | None:
    """The first symbolic link at or under ``directory`` that resolves outside ``root``; None if none.

    Links are not followed into, so a linked directory is judged by where it points, once.
    """
    directory = Path(directory)
    if directory.is_symlink():
        return None if is_inside(directory, root) else directory
    pending = [directory]
    while pending:
        current = pending.pop()
        try:
            entries = list(os.scandir(current))
        except OSError:
            continue
        for entry in entries:
            if entry.is_symlink():
                if not is_inside(Path(entry.path), root):
                    return Path(entry.path)
            elif entry.is_dir(follow_symlinks=False):
                pending.append(Path(entry.path))
    return None


@dataclass(frozen=True)
class ConfinedFile:
    fd: int
    real_path: Path  # where the open file really is
    size: int

    @property
    def reopen_path(self) -> str:
        """A name for exactly this open file, for libraries that take a path: ``/proc/self/fd/N`` on
        Linux (a swap of the original path cannot redirect it), else the verified real path."""
        proc = f"/proc/self/fd/{self.fd}"
        return proc if os.path.exists(proc) else str(self.real_path)


@contextlib.contextmanager
def open_confined(path: Path, root: Path | None) -> Iterator[ConfinedFile]:
    """Opens ``path`` for reading if the file opened is a regular file inside ``root`` (None: anywhere).

    ``O_NONBLOCK`` so a FIFO planted under the name cannot block the open.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise PathEscapeError(f"{path} is not a regular file")
        real = _real_path(fd, Path(path), info)
        if root is not None and not (real == root or real.is_relative_to(root)):
            raise PathEscapeError(f"{path} resolves to {real}, outside {root}")
        yield ConfinedFile(fd, real, info.st_size)
    finally:
        os.close(fd)


def _real_path(fd: int, path: Path, info: os.stat_result) -> Path:
    """The real path of the open descriptor ``fd``; where the OS cannot say, the resolved ``path``, which
    must still be the very file held open (same device and inode)."""
    with contextlib.suppress(OSError):
        return Path(os.readlink(f"/proc/self/fd/{fd}"))
    real = Path(os.path.realpath(path))
    now = os.stat(real)
    if (now.st_dev, now.st_ino) != (info.st_dev, info.st_ino):
        raise PathEscapeError(f"{path} changed while it was being opened")
    return real
