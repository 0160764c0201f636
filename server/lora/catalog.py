"""Where each adapter's files are - a directory of the adapter store, or a path registered at runtime
(vLLM's ``load_lora_adapter``) - and the root they must not leave (the store, or the allowed root the
path was found in), which the reader checks again on every file it opens. Safe from any thread."""

from __future__ import annotations

import threading
from pathlib import Path

from server.lora.errors import AdapterError
from server.store import AdapterStore, is_valid_adapter_name


class AdapterCatalog:
    def __init__(self, store: AdapterStore) -> None:
        self.store = store
        self._paths: dict[str, tuple[Path, Path]] = {}  # registered outside the store: (dir, root)
        self._lock = threading.Lock()

    def exists(self, name: str) -> bool:
        with self._lock:
            if name in self._paths:
                return True
        return self.store.exists(name)

    def names(self) -> list[str]:
        with self._lock:
            registered = set(self._paths)
        return sorted(registered | set(self.store.names()))

    def is_registered(self, name: str) -> bool:
        with self._lock:
            return name in self._paths

    def locate(self, name: str) -> tuple[Path, Path]:
        """(the adapter's directory, the root its files must resolve into); AdapterError if unknown."""
        with self._lock:
            if name in self._paths:
                return self._paths[name]
        if not self.store.exists(name):
            raise AdapterError(f"adapter '{name}' not found")
        return self.store.path_of(name), self.store.root

    def path_of(self, name: str) -> Path:
        """The adapter's directory; AdapterError if there is no adapter of that name."""
        return self.locate(name)[0]

    def register(self, name: str, path: Path, root: Path | None = None) -> bool:
        """Serves the directory ``path`` as ``name``, its files confined to ``root`` (default: the
        directory itself); True if that changes where ``name`` points."""
        if not is_valid_adapter_name(name):
            raise AdapterError(f"invalid adapter name {name!r}")
        path = Path(path)
        if not path.is_dir():
            raise AdapterError(f"adapter '{name}': directory {path} does not exist")
        entry = (path, Path(root or path).resolve())
        with self._lock:
            changed = self._paths.get(name) != entry
            self._paths[name] = entry
        return changed

    def forget(self, name: str) -> None:
        with self._lock:
            self._paths.pop(name, None)
