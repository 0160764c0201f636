"""Disk -> a validated, servable ``LoRAAdapter``: the one place adapter files are parsed.

Checks the adapter against the base model (``load_peft_adapter``) and against this server's LoRA
layers (targeted modules wrapped, rank within the slots), and counts loads for metrics. Uploads and
runtime loads parse through here once and hand the result to the host cache, so no adapter is read
twice on its way in.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from server.lora.adapter import LoRAAdapter, load_peft_adapter
from server.lora.catalog import AdapterCatalog
from server.lora.counters import LoRACounters
from server.lora.layers import LoRAModel
from server.lora.spec import BaseModelSpec


@dataclass
class AdapterReader:
    catalog: AdapterCatalog
    base: BaseModelSpec  # what adapters are validated against
    lora: LoRAModel  # the wrapped layers an adapter must fit
    max_rank: int
    counters: LoRACounters

    def read(self, name: str) -> LoRAAdapter:
        """The adapter the catalog knows as ``name``."""
        return self._timed(lambda: self._parse(*self.catalog.locate(name), name))

    def read_dir(self, path: Path, name: str, root: Path) -> LoRAAdapter:
        """The adapter in directory ``path`` (an upload being staged, a runtime path), as ``name``; its
        files must resolve inside ``root``."""
        return self._timed(lambda: self._parse(path, Path(root).resolve(), name))

    def _parse(self, path: Path, root: Path, name: str) -> LoRAAdapter:
        adapter = load_peft_adapter(path, name, self.base, self.max_rank, root)
        self.lora.check(adapter)
        return adapter

    def _timed(self, read) -> LoRAAdapter:
        start = time.perf_counter()
        try:
            adapter = read()
        except Exception:
            self.counters.add(load_failures=1)
            raise
        self.counters.add(loads=1, load_seconds=time.perf_counter() - start)
        return adapter
