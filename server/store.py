"""The adapter store: one directory per adapter under a root, written atomically.

Why this shape: the store may be a volume shared by several replicas, so correctness cannot rest
on in-process locks. A new adapter is assembled in a hidden staging directory *inside* the root
(same filesystem, so the final ``rename`` is atomic), every file and the directory are fsynced, and
the staging directory is renamed onto the final name. ``rename`` onto an existing non-empty
directory fails, which makes "two uploads of one name" resolve to exactly one winner across
processes. Readers therefore see either no adapter or a complete one, never a half-written one.

Hidden entries (``.staging-*``, ``.trash-*``) can never collide with adapter names, because
``ADAPTER_NAME_PATTERN`` requires a leading letter or digit.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import shutil
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

# A PEFT adapter directory: these two files, and only these are ever read (no pickle formats).
CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER_FILES = (CONFIG_FILE, WEIGHTS_FILE)

# Letters, digits, '.', '_', '-', starting with a letter or digit: no separators, no '..', no hidden
# names, so a valid name joined to a root can never leave it.
ADAPTER_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$"
_NAME_RE = re.compile(ADAPTER_NAME_PATTERN)
_HASH_CHUNK = 1 << 20


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


def replace_dir(src: Path, dst: Path) -> None:
    """Moves ``src`` onto ``dst``; an existing ``dst`` is swapped out first and deleted after, so a
    reader sees the old tree or the new one, never half of either. Both must be on one filesystem."""
    src, dst = Path(src), Path(dst)
    if not dst.exists():
        os.replace(src, dst)
        return
    old = dst.parent / f".{dst.name}.old-{uuid.uuid4().hex[:8]}"
    os.replace(dst, old)
    os.replace(src, dst)
    shutil.rmtree(old, ignore_errors=True)


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

    # --- lookup -----------------------------------------------------------------------------
    def path_of(self, name: str) -> Path:
        """The adapter's directory; the name check makes traversal (``..``, ``/``) impossible."""
        path = self.root / check_adapter_name(name)
        if path.parent != self.root:  # belt and braces: the pattern already forbids separators
            raise InvalidAdapterNameError(f"invalid adapter name {name!r}")
        return path

    def exists(self, name: str) -> bool:
        try:
            path = self.path_of(name)
        except InvalidAdapterNameError:
            return False
        return (path / CONFIG_FILE).is_file() and not path.is_symlink()

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
            config = json.loads((path / CONFIG_FILE).read_text("utf-8"))
        except (OSError, ValueError):
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
        path = self.root / f".staging-{uuid.uuid4().hex}"
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
        trash = self.root / f".trash-{uuid.uuid4().hex}"
        os.rename(self.path_of(name), trash)
        _fsync_path(self.root)
        self._digests.pop(name, None)
        return trash

    def purge(self, trash: Path) -> None:
        """Deletes a directory returned by :meth:`remove`."""
        trash = Path(trash)
        if trash.parent == self.root and trash.name.startswith(".trash-"):
            shutil.rmtree(trash, ignore_errors=True)
