"""The one adapter service the HTTP layer talks to: list, describe, resolve, load, unload, upload,
delete, merge-export. Blocking work runs in threads; results and errors are typed, never HTTP.

It joins the adapter store (files on disk) with the LoRA stack (parsed copies, device slots) and the
engine's stats (to let in-flight requests finish before a delete takes effect). Access control - which
key may see which adapter - stays in the HTTP layer; everything here assumes the caller may.
"""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from server.config import Settings
from server.engine.types import EngineStats
from server.lora.adapter import LoRAAdapter
from server.lora.counters import LoRACounters
from server.lora.errors import AdapterError
from server.lora.merge import export_merged
from server.lora.reader import AdapterReader
from server.lora.ref import AdapterRef, names_in_key
from server.lora.setup import LoRAStack
from server.service.errors import (
    AdapterConflictError,
    AdapterNotFoundError,
    InvalidAdapterError,
    LoRADisabledError,
)
from server.service.paths import allowed_adapter_path, check_name
from server.service.resolve import resolve_model
from server.service.results import AdapterInfo, MergeResult
from server.store import (
    AdapterExistsError,
    AdapterMissingError,
    AdapterStore,
    replace_dir,
    temp_name,
    tree_digest,
)


@dataclass
class AdapterService:
    settings: Settings
    store: AdapterStore
    lora: LoRAStack | None  # None: LoRA disabled
    base_name: str  # the served name of the base model
    engine_stats: Callable[[], EngineStats]

    # --- reads --------------------------------------------------------------------------------
    def names(self) -> list[str]:
        """Every adapter a request may name: the store's, plus paths registered at runtime."""
        return self.lora.catalog.names() if self.lora is not None else self.store.names()

    def exists(self, name: str) -> bool:
        return self.lora.catalog.exists(name) if self.lora is not None else self.store.exists(name)

    def describe(self, name: str) -> AdapterInfo:
        """Blocking (hashes the files on a cache miss): run it off the event loop."""
        check_name(name, "name")
        resident = name in self.engine_stats().resident_adapters
        if not self.store.exists(name):
            if not self.exists(name):
                raise AdapterNotFoundError(f"The model `{name}` does not exist.", "name")
            return AdapterInfo(name=name, source="path", resident=resident)
        stored = self.store.describe(name)
        return AdapterInfo(
            name=name,
            source="store",
            resident=resident,
            rank=stored.rank,
            target_modules=stored.target_modules,
            size_bytes=stored.size_bytes,
            digest=f"sha256:{stored.digest}",
            config=stored.config,
        )

    def resolve(self, model: str, composition: dict[str, float] | None = None) -> AdapterRef | None:
        """The weights a request's ``model`` / ``adapters`` fields ask for, loading them in the
        background from now on so they are likely in host memory when the request is scheduled."""
        exists = self.lora.catalog.exists if self.lora is not None else (lambda _: False)
        ref = resolve_model(model, composition, self.base_name, self.settings.merged_adapter, exists)
        if ref is not None:
            self.lora.cache.prefetch(ref)
        return ref

    def stats(self) -> LoRACounters | None:
        return self.lora.cache.counters.snapshot() if self.lora is not None else None

    # --- runtime loading (vLLM's load_lora_adapter / unload_lora_adapter) -----------------------
    async def load(self, name: str, lora_path: str, inplace: bool = False) -> None:
        """Parses the adapter at ``lora_path`` once and serves it as ``name``; a bad path never
        replaces what ``name`` served before."""
        lora = self._require_lora()
        check_name(name, "lora_name")
        path, root = allowed_adapter_path(lora_path, self.settings.allowed_lora_roots)
        if not inplace and lora.catalog.exists(name):
            raise InvalidAdapterError(
                f"The lora adapter '{name}' has already been loaded. "
                "If you want to load the adapter in place, set 'load_inplace' to True.",
                "lora_name",
            )
        try:
            adapter = await asyncio.to_thread(lora.reader.read_dir, path, name, root)
        except AdapterError as exc:
            raise InvalidAdapterError(str(exc), "lora_path") from None
        lora.catalog.register(name, path, root)
        lora.cache.replace(name, adapter)
        lora.manager.revive(name)

    async def unload(self, name: str) -> None:
        lora = self._require_lora()
        check_name(name, "lora_name")
        if not lora.catalog.exists(name):
            raise AdapterNotFoundError(f"The lora adapter '{name}' cannot be found.", "lora_name")
        lora.catalog.forget(name)
        await asyncio.to_thread(lora.manager.retire, name)

    # --- the store ----------------------------------------------------------------------------
    async def upload(self, name: str, files: Mapping[str, BinaryIO]) -> AdapterInfo:
        """Stages ``files`` (file name -> readable), parses them as serving will, publishes them
        atomically, and keeps the parsed copy; nothing is visible unless all of that succeeds."""
        lora = self._require_lora()
        check_name(name, "name")
        if self.exists(name):
            raise AdapterConflictError(f"adapter '{name}' already exists", "name")
        adapter = await asyncio.to_thread(stage_and_commit, self.store, lora.reader, name, files)
        lora.cache.replace(name, adapter)
        return await asyncio.to_thread(self.describe, name)

    async def delete(self, name: str) -> None:
        """Hides the adapter at once (new requests: not found), lets queued and running requests
        finish (up to ``drain_timeout_s``), then drops its weights and files, so a later upload
        under the same name is never served the old weights."""
        check_name(name, "name")
        try:
            trash = await asyncio.to_thread(self.store.remove, name)
        except AdapterMissingError:
            raise AdapterNotFoundError(f"The model `{name}` does not exist.", "name") from None
        try:
            if self.lora is not None:
                await self._wait_unused(name, self.settings.drain_timeout_s)
                await asyncio.to_thread(self.lora.manager.retire, name)
        finally:
            await asyncio.to_thread(self.store.purge, trash)

    async def _wait_unused(self, name: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.engine_stats()
            keys = (*stats.running_adapters, *stats.waiting_adapters)
            if not any(name in names_in_key(k) for k in keys):
                return
            await asyncio.sleep(0.05)

    async def merge(self, name: str) -> MergeResult:
        """Exports base + adapter as a standalone HF checkpoint under ``export_dir/<name>``."""
        lora = self._require_lora()
        check_name(name, "name")
        if not lora.catalog.exists(name):
            raise AdapterNotFoundError(f"The model `{name}` does not exist.", "name")
        export_root = Path(self.settings.export_dir)
        export_root.mkdir(parents=True, exist_ok=True)
        staged, final = export_root / temp_name("merge"), export_root / name
        try:
            path, root = lora.catalog.locate(name)
            await asyncio.to_thread(export_merged, self.settings.model, path, staged, confine_to=root)
            digest = await asyncio.to_thread(tree_digest, staged)
            await asyncio.to_thread(replace_dir, staged, final)
        finally:
            if staged.exists():
                await asyncio.to_thread(shutil.rmtree, staged, True)
        return MergeResult(name=name, path=final.resolve(), digest=f"sha256:{digest}")

    def _require_lora(self) -> LoRAStack:
        if self.lora is None:
            raise LoRADisabledError("LoRA is disabled on this server (enable_lora=false)")
        return self.lora


def stage_and_commit(
    store: AdapterStore, reader: AdapterReader, name: str, files: Mapping[str, BinaryIO]
) -> LoRAAdapter:
    """Blocking: writes ``files`` into a staging directory of the store, parses them there exactly as
    serving will, and renames the directory onto ``name``; returns the parsed adapter."""
    with store.staging() as staged:
        for file_name, source in files.items():
            source.seek(0)
            with open(staged / file_name, "wb") as out:
                shutil.copyfileobj(source, out, 1 << 20)
        try:
            adapter = reader.read_dir(staged, name, staged)
        except AdapterError as exc:
            raise InvalidAdapterError(str(exc).replace(str(staged), "<upload>")) from None
        try:
            adapter.source = store.commit(staged, name).path
        except AdapterExistsError as exc:
            raise AdapterConflictError(str(exc), "name") from None
    return adapter
