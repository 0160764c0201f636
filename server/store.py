"""The adapter store: one directory per adapter under a root, written atomically.

Why this shape: the store may be a volume shared by several replicas, so correctness cannot rest
on in-process locks. A new adapter is assembled in a hidden staging directory *inside* the root
(same filesystem, so the final ``rename`` is atomic), every file and the directory are fsynced, and
the staging directory is renamed onto the final name. ``rename`` onto an existing non-empty
directory fails, which makes "two uploads of one name" resolve to exactly one winner across
processes. Readers therefore see either no adapter or a complete one, never a half-written one.

Hidden entries (``.staging-*``, ``.trash-*``) can never collide with adapter names, because
``ADAPTER_NAME_PATTERN`` requires a leading letter or digit. Each temporary entry's name ends with the
``<pid>@<host>`` of the process that made it, so a server starting after a crash (SIGKILL, OOM kill,
power loss) removes what *it* left behind (:func:`recover_dir`) without touching what another replica
sharing the volume is writing right now.

An adapter directory, or a file in it, that is a symbolic link resolving outside the store is not an
adapter: it is not listed, served, loaded, merged or deleted through, and is reported once in the log.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from server.confined import escaping_link

log = logging.getLogger(__name__)

# A PEFT adapter directory: these two files, and only these are ever read (no pickle formats).
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)
MAX_CONFIG_BYTES = 1 << 20  # PEFT configs are a few kB; a larger one is only there to be slow to parse

# Letters, digits, '.', '_', '-', starting with a letter or digit: no separators, no '..', no hidden
# names, so a valid name joined to a root can never leave it.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
_HASH_CHUNK = 1 << 20
# ".<kind>-<uuid>.<pid>@<host>", optionally followed by export_merged's ".tmp-<hex>"
_TEMP_RE = re.compile(r"^\..*-[0-9a-f]{32}\.(?P<pid>\d+)@(?P<host>[A-Za-z0-9_.-]+?)(?:\.tmp-[0-9a-f]{8})?$")
LEFTOVER_MAX_AGE_S = 6 * 3600  # another host's temporary entry untouched this long: its process is gone


class StoreError(Exception):
    """A store operation failed for a reason the caller can report."""


class InvalidAdapterNameError(StoreError, ValueError):
    """The name does not match ``ADAPTER_NAME_PATTERN``."""


class AdapterExistsError(StoreError):
    """Another adapter (or a concurrent upload) already holds the name."""


class AdapterMissingError(StoreError):
    """No adapter of that name in the store."""


def is_valid_adapter_name(name: object) -> bool:
    return isinstance(name, str) and _NAME_RE.fullmatch(name) is not None


def check_adapter_name(name: str) -> str:
    """Returns ``name`` if it is a valid adapter name, else raises :class:`InvalidAdapterNameError`."""
    if not is_valid_adapter_name(name):
        raise InvalidAdapterNameError(
            f"invalid adapter name {name!r}: must match {ADAPTER_NAME_PATTERN} "
            "(letters, digits, '.', '_', '-'; at most 128 characters; starts with a letter or digit)"
        )
    return name


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_HASH_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def tree_digest(root: Path) -> str:
    """sha256 of a directory: of the sorted manifest lines ``"<file sha256>  <relative path>\\n"``.

    The manifest is the same text ``sha256sum`` prints, so a digest can be checked by hand.
    """
    lines = []
    for path in sorted(p for p in Path(root).rglob("*") if p.is_file()):
        lines.append(f"{file_sha256(path)}  {path.relative_to(root).as_posix()}\n")
    return hashlib.sha256("".join(lines).encode("utf-8")).hexdigest()


def temp_name(kind: str) -> str:
    """A hidden, unique name saying which process made it: ``.<kind>-<uuid>.<pid>@<host>``."""
    return f".{kind}-{uuid.uuid4().hex}.{os.getpid()}@{socket.gethostname()}"


def replace_dir(src: Path, dst: Path) -> None:
    """Moves ``src`` onto ``dst``; an existing ``dst`` is swapped out first and deleted after, so a
    reader sees the old tree or the new one, never half of either. Both must be on one filesystem.
    A crash between the two renames leaves ``.<dst>.old-*``, which :func:`recover_dir` puts back."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / temp_name(f"{dst.name}.old")
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return pid == os.getpid()  # a previous life of this container, which had our pid


def _left_behind(path: Path) -> bool:
    """Whether the process that made the temporary entry ``path`` is gone: it was of this host and no
    longer runs, or nothing touched the entry for ``LEFTOVER_MAX_AGE_S`` (another host's; a reused pid)."""
    match = _TEMP_RE.match(path.name)
    if match is None:
        return False
    if match["host"] == socket.gethostname() and _process_gone(int(match["pid"])):
        return True
    with contextlib.suppress(OSError):
        newest = max([path.lstat().st_mtime, *(p.lstat().st_mtime for p in path.iterdir())])
        return time.time() - newest > LEFTOVER_MAX_AGE_S
    return False


def recover_dir(directory: Path) -> list[str]:
    """At start: deletes the trash (``.trash-*``) and the temporary entries whose process is gone
    (staging and export directories), and puts back a directory a crash left swapped out by
    :func:`replace_dir`. Returns what it did, one line per entry."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    done = []
    for entry in sorted(directory.iterdir()):
        if not (entry.name.startswith(".trash-") or _left_behind(entry)):
            continue
        original = directory / entry.name[1:].rpartition(".old-")[0] if ".old-" in entry.name else None
        try:
            if original is not None and not original.exists():
                os.rename(entry, original)
                done.append(f"restored {original.name} from {entry.name}")
            else:
                shutil.rmtree(entry)
                done.append(f"removed {entry.name}")
        except OSError as exc:  # a read-only volume, a racing replica: serving goes on regardless
            log.warning("%s: could not clear %s (%s)", directory, entry.name, exc)
    for line in done:
        log.info("%s: %s (left by an earlier crash)", directory, line)
    return done


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(root: Path) -> None:
    """fsyncs every file, then every directory bottom-up, so a rename publishes durable bytes."""
    dirs = [root]
    for path in Path(root).rglob("*"):
        if path.is_file():
            _fsync_path(path)
        elif path.is_dir():
            dirs.append(path)
    for d in sorted(dirs, key=lambda p: len(p.parts), reverse=True):
        _fsync_path(d)


@dataclass(frozen=True)
class StoredAdapter:
    """What the store knows about one adapter, without parsing its weights."""

    name: str
    path: Path
    size_bytes: int
    digest: str
    config: dict = field(default_factory=dict)

    @property
    def rank(self) -> int | None:
        r = self.config.get("r")
        return r if isinstance(r, int) else None

    @property
    def target_modules(self) -> list[str] | str | None:
        return self.config.get("target_modules")


class AdapterStore:
    """Filesystem operations on the store root; paths are always ``root / <validated name>``."""

    def __init__(self, root: Path) -> None:
        root = Path(root)
        root.mkdir(parents=True, exist_ok=True)
        self.root = root.resolve()
        # (name -> (stat fingerprint, digest)); owned by this instance, so no global state.
        self._digests: dict[str, tuple[tuple, str]] = {}
        self._reported: set[str] = set()  # names already logged as escaping the store

    # --- lookup -----------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The adapter's directory; the name check makes traversal (``..``, ``/``) impossible."""
        path = self.root / check_adapter_name(name)
        if path.parent != self.root:  # belt and braces: the pattern already forbids separators
            raise InvalidAdapterNameError(f"invalid adapter name {name!r}")
        return path

    def exists(self, name: str) -> bool:
        """A complete adapter directory of the store (a linked directory, or one holding a link that
        resolves outside the store, is not one)."""
        try:
            path = self.path_of(name)
        except InvalidAdapterNameError:
            return False
        if path.is_symlink():
            self._report(name, path)
            return False
        if not (path / CONFIG_FILE).is_file():
            return False
        link = escaping_link(path, self.root)
        if link is not None:
            self._report(name, link)
            return False
        self._reported.discard(name)
        return True

    def _report(self, name: str, link: Path) -> None:
        if name not in self._reported:
            self._reported.add(name)
            log.warning("adapter store: '%s' is not served: %s is a symbolic link to %s (linked adapter "
                        "directories, and links leading outside %s, are refused)",
                        name, link, os.path.realpath(link), self.root)  # fmt: skip

    def names(self) -> list[str]:
        out = []
        for entry in os.scandir(self.root):
            if self.exists(entry.name):
                out.append(entry.name)
        return sorted(out)

    def describe(self, name: str) -> StoredAdapter:
        if not self.exists(name):
            raise AdapterMissingError(f"adapter '{name}' is not in the store")
        path = self.path_of(name)
        files = sorted(p for p in path.rglob("*") if p.is_file())
        try:
            if (path / CONFIG_FILE).stat().st_size > MAX_CONFIG_BYTES:
                raise ValueError("oversize config")
            config = json.loads((path / CONFIG_FILE).read_text("utf-8"))
        except (OSError, ValueError, RecursionError):
            config = {}
        return StoredAdapter(
            name=name,
            path=path,
            size_bytes=sum(p.stat().st_size for p in files),
            digest=self.digest(name),
            config=config if isinstance(config, dict) else {},
        )

    def digest(self, name: str) -> str:
        """Tree digest, recomputed only when a file's size, mtime or inode changed."""
        path = self.path_of(name)
        fingerprint = tuple(
            (p.relative_to(path).as_posix(), st.st_size, st.st_mtime_ns, st.st_ino)
            for p in sorted(path.rglob("*"))
            if p.is_file() and (st := p.stat())
        )
        cached = self._digests.get(name)
        if cached is not None and cached[0] == fingerprint:
            return cached[1]
        value = tree_digest(path)
        self._digests[name] = (fingerprint, value)
        return value

    # --- writes -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def staging(self) -> Iterator[Path]:
        """A fresh hidden directory inside the root; removed on exit unless it was committed."""
        path = self.root / temp_name("staging")
        path.mkdir()
        try:
            yield path
        finally:
            if path.exists():
                shutil.rmtree(path, ignore_errors=True)

    def commit(self, staged: Path, name: str) -> StoredAdapter:
        """Publishes a staged directory as ``name`` atomically; :class:`AdapterExistsError` if taken."""
        final = self.path_of(name)
        staged = Path(staged)
        if staged.parent != self.root or not staged.name.startswith(".staging-"):
            raise StoreError(f"{staged} is not a staging directory of this store")
        if final.exists() or final.is_symlink():
            raise AdapterExistsError(f"adapter '{name}' already exists")
        fsync_tree(staged)
        try:
            os.rename(staged, final)  # fails if another writer published a (non-empty) dir first
        except OSError as exc:
            if exc.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.EISDIR, errno.ENOTDIR):
                raise AdapterExistsError(f"adapter '{name}' already exists") from exc
            raise
        _fsync_path(self.root)
        return self.describe(name)

    def remove(self, name: str) -> Path:
        """Hides the adapter at once (rename to ``.trash-*``); returns the trash path to purge."""
        if not self.exists(name):
            raise AdapterMissingError(f"adapter '{name}' is not in the store")
        trash = self.root / temp_name("trash")
        os.rename(self.path_of(name), trash)
        _fsync_path(self.root)
        self._digests.pop(name, None)
        return trash

    def purge(self, trash: Path) -> None:
        """Deletes a directory returned by :meth:`remove`."""
        trash = Path(trash)
        if trash.parent == self.root and trash.name.startswith(".trash-"):
            shutil.rmtree(trash, ignore_errors=True)
