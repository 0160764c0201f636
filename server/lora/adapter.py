"""PEFT LoRA adapters: read from ``adapter_config.json`` + ``adapter_model.safetensors``, validated.

Only safetensors are read (a pickle can execute code; ``torch.load`` is never called), and only from
inside the adapter's confinement root (``server/confined.py``), checked on the opened file. What a
hostile file could make expensive is bounded before it is parsed: the config's size, and the tensor
count, read from the safetensors header alone against what the base model can hold. Every check
raises :class:`AdapterError` naming the file, tensor key or module and the expected vs actual value,
so a bad upload is refused at load time instead of failing a request later. The result holds fp32
CPU tensors in PEFT's own layout (A: [r, in], B: [out, r]) plus the precomputed DoRA rescale.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import SafetensorError, deserialize, safe_open

from server.confined import PathEscapeError, open_confined
from server.lora.errors import AdapterError
from server.lora.peft_config import LoraConfigView, PatternError, parse_lora_config
from server.lora.spec import BaseModelSpec, LinearSpec
from server.store import CONFIG_FILE, MAX_CONFIG_BYTES, WEIGHTS_FILE

_TENSORS_PER_MODULE = 4  # lora_A, lora_B, lora_B.bias or magnitude, plus slack for the older magnitude key
_HEADER_BYTES_PER_TENSOR = 512  # a header entry is ~130 bytes: key, dtype, shape, offsets
_HEADER_SLACK_BYTES = 64 * 1024  # __metadata__

_FLOAT_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
_DTYPES_EXPECTED = "F64, F32, F16 or BF16"
WHOLE_READ_MAX_BYTES = 64 << 20

_PREFIX = "base_model.model."
_SUFFIXES = {  # tensor key suffix -> role
    ".lora_A.weight": "a",
    ".lora_B.weight": "b",
    ".lora_B.bias": "bias",
    ".lora_magnitude_vector": "magnitude",
    ".lora_magnitude_vector.weight": "magnitude",  # older PEFT naming
}

__all__ = [
    "AdapterError",
    "BaseModelSpec",
    "LinearSpec",
    "LoRAAdapter",
    "LoRAModuleWeights",
    "dora_rescale",
    "load_peft_adapter",
]


@dataclass
class LoRAModuleWeights:
    """One module's delta: ``y += scale * (B @ A @ x + bias)``; with DoRA ``y = g * (W x + that) + b0``.

    ``dora_g`` is DoRA's fixed per-output rescale ``magnitude / ||W + scale * B A||_row``, computed at
    load against the base weights so a DoRA adapter runs through the same batched op as a plain one.
    """

    a: torch.Tensor  # [r, in]
    b: torch.Tensor  # [out, r]
    scale: float
    bias: torch.Tensor | None = None  # [out], PEFT's lora_B.bias (scaled like B)
    dora_g: torch.Tensor | None = None  # [out]

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    """A parsed adapter (or a virtual composition), ready to be copied into device slots."""

    name: str
    modules: dict[str, LoRAModuleWeights]
    source: Path | None = None
    config: LoraConfigView | None = None
    parts: list[tuple[str, float]] = field(default_factory=list)  # set for compositions

    @property
    def rank(self) -> int:
        return max((m.rank for m in self.modules.values()), default=0)

    @property
    def is_dora(self) -> bool:
        return any(m.dora_g is not None for m in self.modules.values())


def load_peft_adapter(
    path: Path, name: str, base: BaseModelSpec, max_rank: int, root: Path | None = None
) -> LoRAAdapter:
    """Reads and validates the PEFT LoRA adapter in directory ``path`` against ``base``; its files must
    resolve inside ``root`` (resolved; None: anywhere, for trusted local paths such as the CLI's)."""
    path = Path(path)
    if not path.is_dir():
        raise AdapterError(f"adapter '{name}': directory {path} does not exist")
    config_path, weights_path = path / CONFIG_FILE, path / WEIGHTS_FILE
    if not config_path.is_file():
        raise AdapterError(f"adapter '{name}': missing {CONFIG_FILE} in {path}")
    if not weights_path.is_file():
        pickles = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt"))
        if pickles:
            raise AdapterError(
                f"adapter '{name}': refusing pickle weights {pickles[0]} (arbitrary code on load); "
                f"save the adapter with safetensors ({WEIGHTS_FILE})"
            )
        raise AdapterError(f"adapter '{name}': missing {WEIGHTS_FILE} in {path}")
    try:
        config = parse_lora_config(_read_config(config_path, root))
    except AdapterError as exc:
        raise AdapterError(f"adapter '{name}': {exc}") from None
    try:  # module names are matched against the config's patterns from here on
        _check_config_targets(config, base, name)
        tensors = _read_safetensors(
            weights_path, name, root, max_tensors_for(base), max_bytes_for(base, max_rank)
        )
        modules = _group_by_module(tensors, name)
        _check_modules(config, modules, base, name)
        built = {
            module: _build_module(module, roles, config, base, max_rank, name)
            for module, roles in modules.items()
        }
    except PatternError as exc:
        raise AdapterError(f"adapter '{name}': {exc}") from None
    return LoRAAdapter(name=name, modules=built, source=path, config=config)


def max_tensors_for(base: BaseModelSpec) -> int:
    """Most tensors a LoRA adapter of ``base`` can hold: A, B and a bias or DoRA magnitude per linear."""
    return _TENSORS_PER_MODULE * len(base.linears)


def max_bytes_for(base: BaseModelSpec, max_rank: int) -> int:
    """Largest ``adapter_model.safetensors`` an adapter of ``base`` up to ``max_rank`` can be: A, B, a
    bias and a DoRA magnitude per linear in float64, plus the largest header ``_check_header`` allows."""
    values = sum(
        max_rank * (s.in_features + s.out_features) + 2 * s.out_features for s in base.linears.values()
    )
    header = max_tensors_for(base) * _HEADER_BYTES_PER_TENSOR + _HEADER_SLACK_BYTES
    return 8 + header + 8 * values


def _read_config(path: Path, root: Path | None) -> object:
    try:
        with open_confined(path, root) as f:
            if f.size > MAX_CONFIG_BYTES:
                raise AdapterError(f"{CONFIG_FILE} is {f.size} bytes, over the limit of {MAX_CONFIG_BYTES}")
            return json.loads(_read_exactly(f.fd, f.size, 0))
    except PathEscapeError as exc:
        raise AdapterError(f"{CONFIG_FILE} refused: {exc}") from None
    except (OSError, UnicodeDecodeError, RecursionError, ValueError) as exc:
        raise AdapterError(f"{CONFIG_FILE} is not valid JSON ({exc})") from None


def _read_safetensors(
    path: Path, name: str, root: Path | None, max_tensors: int, max_bytes: int
) -> dict[str, torch.Tensor]:
    """The file's tensors. Up to ``WHOLE_READ_MAX_BYTES`` (64 MiB) the file is read whole and parsed by
    safetensors' ``deserialize``, not through ``safe_open(...).get_tensor``: safetensors 0.8 keeps ~50
    bytes (and more native memory) per ``get_tensor`` call for good, measured (a server loading
    adapters all day grew its RSS steadily); it is also half the time. Larger files are memory-mapped
    (``safe_open``): reading them whole would hold the bytes three times over. The file's size is
    bounded first (``max_bytes``)."""
    try:
        with open_confined(path, root) as f:
            _check_header(f.fd, max_tensors)
            if f.size > max_bytes:
                raise AdapterError(
                    f"is {f.size} bytes, more than an adapter of this base model at max_lora_rank can "
                    f"hold ({max_bytes})"
                )
            if f.size > WHOLE_READ_MAX_BYTES:  # memory-mapped instead of held in memory three times over
                with safe_open(f.reopen_path, framework="pt", device="cpu") as st:
                    return {key: st.get_tensor(key) for key in st.keys()}  # noqa: SIM118 - no __iter__
            data = _read_exactly(f.fd, f.size, 0)
        return {key: _tensor(key, view) for key, view in sorted(deserialize(data))}  # safe_open's order
    except PathEscapeError as exc:
        raise AdapterError(f"adapter '{name}': {WEIGHTS_FILE} refused: {exc}") from None
    except AdapterError as exc:
        raise AdapterError(f"adapter '{name}': {WEIGHTS_FILE} {exc}") from None
    except (SafetensorError, OSError, RuntimeError, ValueError) as exc:
        raise AdapterError(f"adapter '{name}': {WEIGHTS_FILE} is corrupt or truncated ({exc})") from None


def _tensor(key: str, view: dict) -> torch.Tensor:
    dtype = _FLOAT_DTYPES.get(view["dtype"])
    if dtype is None:  # the header said otherwise (_check_header): the file changed while read
        raise ValueError(f"tensor {key!r} is {view['dtype']} in the data but a float in the header")
    if not view["data"]:
        return torch.empty(view["shape"], dtype=dtype)
    return torch.frombuffer(bytearray(view["data"]), dtype=dtype).reshape(view["shape"])


def _check_header(fd: int, max_tensors: int) -> None:
    """Refuses, from the header alone, a file with more tensors than an adapter of the base can hold
    (parsing 100,000 tiny tensors would hold a worker - and the GIL - for seconds), or with a tensor
    that is not a float (before any is read, whichever way the file is read next)."""
    max_header = max_tensors * _HEADER_BYTES_PER_TENSOR + _HEADER_SLACK_BYTES
    length = int.from_bytes(_read_exactly(fd, 8, 0), "little")
    if length > max_header:
        raise AdapterError(
            f"has a {length}-byte header, more than {max_tensors} tensors (the most a LoRA adapter of "
            f"this base model holds) can need ({max_header} bytes)"
        )
    header = json.loads(_read_exactly(fd, length, 8))
    count = len(header) - ("__metadata__" in header) if isinstance(header, dict) else 0
    if count > max_tensors:
        raise AdapterError(
            f"holds {count} tensors, more than a LoRA adapter of this base model can ({max_tensors})"
        )
    for key, entry in header.items() if isinstance(header, dict) else ():
        dtype = entry.get("dtype") if isinstance(entry, dict) else None
        if key != "__metadata__" and not (isinstance(dtype, str) and dtype in _FLOAT_DTYPES):
            raise AdapterError(f"tensor {key!r} has dtype {dtype}; {_DTYPES_EXPECTED} expected")


def _read_exactly(fd: int, size: int, offset: int) -> bytes:
    data = os.pread(fd, size, offset)
    if len(data) != size:
        raise ValueError(f"file ends after {offset + len(data)} bytes, expected {offset + size}")
    return data


def _group_by_module(
    tensors: dict[str, torch.Tensor], name: str
) -> dict[str, dict[str, tuple[str, torch.Tensor]]]:
    """{module path: {role: (key, tensor)}}; unknown keys (embedding LoRA, base biases...) are refused."""
    if not tensors:
        raise AdapterError(f"adapter '{name}': {WEIGHTS_FILE} holds no tensors")
    keys: dict[str, dict[str, str]] = {}  # module -> role -> tensor key
    for key in tensors:
        role = next((r for s, r in _SUFFIXES.items() if key.endswith(s) and key.startswith(_PREFIX)), None)
        if role is None:
            hint = " (embedding LoRA is not supported)" if "lora_embedding" in key else ""
            raise AdapterError(f"adapter '{name}': unexpected tensor key {key!r}{hint}")
        suffix = next(s for s, r in _SUFFIXES.items() if key.endswith(s) and r == role)
        module = key[len(_PREFIX) : -len(suffix)]
        keys.setdefault(module, {})[role] = key
    converted = _finite_float32(tensors, name)
    return {
        module: {role: (key, converted[key]) for role, key in roles.items()} for module, roles in keys.items()
    }


def _finite_float32(tensors: dict[str, torch.Tensor], name: str) -> dict[str, torch.Tensor]:
    """The tensors as float32 views of one buffer, checked for NaN and inf after the conversion (so a
    float64 value past float32's range is refused too).

    One float64 sum over the buffer checks them all: NaN and inf propagate through a sum, and float32
    values cannot overflow a float64 one. ``isfinite`` per tensor cost a load ~30 us a tensor (1 ms
    for an adapter of 32 tensors, measured), and loads run beside the engine, on its cores.
    """
    flat = torch.cat([t.reshape(-1) for t in tensors.values()]).to(torch.float32)
    pieces = flat.split([t.numel() for t in tensors.values()])
    converted = {key: piece.view(t.shape) for (key, t), piece in zip(tensors.items(), pieces, strict=True)}
    if not math.isfinite(flat.sum(dtype=torch.float64)):
        key = next(k for k, t in converted.items() if not torch.isfinite(t).all())
        raise AdapterError(f"adapter '{name}': tensor {key!r} contains NaN or inf values")
    return converted


def _check_config_targets(config: LoraConfigView, base: BaseModelSpec, name: str) -> None:
    """What the config targets must exist in the base and be a served linear (checked before tensors)."""
    missing_targets = config.unmatched_targets(list(base.linears) + list(base.other_modules))
    if missing_targets:
        raise AdapterError(
            f"adapter '{name}': target modules {missing_targets} are absent from the base model"
        )
    for module, kind in base.other_modules.items():
        if config.targets(module):
            raise AdapterError(
                f"adapter '{name}': target module '{module}' is a {kind}, which LoRA is not served on"
            )


def _check_modules(config: LoraConfigView, modules: dict, base: BaseModelSpec, name: str) -> None:
    """Tensors, config and base must agree on the set of adapted modules."""
    for module in sorted(modules):
        if module not in base.linears:
            kind = base.other_modules.get(module)
            why = f"is a {kind}, which LoRA is not served on" if kind else "is absent from the base model"
            raise AdapterError(f"adapter '{name}': target module '{module}' {why}")
        if not config.targets(module):
            raise AdapterError(
                f"adapter '{name}': tensors for module '{module}' which adapter_config.json does not target"
            )
    for module in base.linears:
        if config.targets(module) and module not in modules:
            raise AdapterError(f"adapter '{name}': no tensors for targeted module '{module}'")


def _build_module(
    module: str, roles: dict, config: LoraConfigView, base: BaseModelSpec, max_rank: int, name: str
) -> LoRAModuleWeights:
    spec = base.linears[module]
    where = f"adapter '{name}', module '{module}'"
    expected_roles = (
        {"a", "b"} | ({"bias"} if config.lora_bias else set()) | ({"magnitude"} if config.use_dora else set())
    )
    for role in sorted(expected_roles - roles.keys()):
        suffix = next(s for s, r in _SUFFIXES.items() if r == role)
        raise AdapterError(f"{where}: missing tensor key '{_PREFIX}{module}{suffix}'")
    for role in sorted(roles.keys() - expected_roles):
        raise AdapterError(f"{where}: unexpected tensor key '{roles[role][0]}' (config does not enable it)")
    r, _ = config.rank_and_alpha(module)
    a_key, a = roles["a"]
    b_key, b = roles["b"]
    if a.dim() != 2 or a.shape[0] != r or a.shape[1] != spec.in_features:
        raise AdapterError(f"{where}: {a_key} has shape {list(a.shape)}, expected [{r}, {spec.in_features}]")
    if b.dim() != 2 or b.shape != (spec.out_features, r):
        raise AdapterError(f"{where}: {b_key} has shape {list(b.shape)}, expected [{spec.out_features}, {r}]")
    if r > max_rank:
        raise AdapterError(f"{where}: rank {r} exceeds max_lora_rank={max_rank}")
    for role in ("bias", "magnitude"):
        if role in roles and tuple(roles[role][1].shape) != (spec.out_features,):
            key, t = roles[role]
            raise AdapterError(f"{where}: {key} has shape {list(t.shape)}, expected [{spec.out_features}]")
    weights = LoRAModuleWeights(a=a.contiguous(), b=b.contiguous(), scale=config.scale(module))
    if "bias" in roles:  # served as an added vector, so the base layer needs no bias (merging does)
        weights.bias = roles["bias"][1]
    if "magnitude" in roles:
        weights.dora_g = dora_rescale(base.weight(module), weights, roles["magnitude"][1])
    return weights


def dora_rescale(weight: torch.Tensor, lora: LoRAModuleWeights, magnitude: torch.Tensor) -> torch.Tensor:
    """DoRA's ``g = magnitude / ||W + scale * B A||`` with the norm over each output row (PEFT's dim=1)."""
    combined = weight.to(torch.float32) + lora.scale * (lora.b @ lora.a)
    return magnitude.to(torch.float32) / torch.linalg.norm(combined, dim=1)
