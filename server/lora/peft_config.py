"""``adapter_config.json`` of a PEFT LoRA adapter: parsed, refused when unsupported, and queried.

The matching rules (``target_modules`` as list or regex, ``exclude_modules``, ``layers_to_transform``
with ``layers_pattern``, ``rank_pattern``/``alpha_pattern`` keys) mirror PEFT's own
(``peft.tuners.tuners_utils.check_target_module_exists`` and ``peft.utils.other.get_pattern_key``) so an
adapter means here exactly what it meant when it was trained. PEFT is not imported at serve time.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from server.lora.errors import AdapterError

# Options that change what the saved tensors mean (or add tensors we cannot serve); refused unless
# they hold their "off" value. Options not listed (dropout, init method, task_type...) do not matter
# at inference because the trained weights are what is saved.
_MUST_BE_OFF = (
    "modules_to_save",
    "trainable_token_indices",
    "target_parameters",
    "layer_replication",
    "alora_invocation_tokens",
    "use_qalora",
    "use_bdlora",
    "megatron_config",
    "velora_config",
    "monteclora_config",
    "kasa_config",
    "arrow_config",
)
# Init methods that rewrite the base weights: the adapter is only valid against that residual base.
_BASE_MUTATING_INITS = ("pissa", "olora", "corda")


@dataclass(frozen=True)
class LoraConfigView:
    """The subset of a PEFT ``LoraConfig`` that decides which modules get which rank and scale."""

    r: int
    lora_alpha: float
    target_modules: str | frozenset[str]
    exclude_modules: str | frozenset[str] | None = None
    layers_to_transform: int | frozenset[int] | None = None
    layers_pattern: tuple[str, ...] = ()
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    use_rslora: bool = False
    use_dora: bool = False
    lora_bias: bool = False

    def targets(self, key: str) -> bool:
        """Whether PEFT would put a LoRA on the module named ``key`` (check_target_module_exists)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if re.fullmatch(self.exclude_modules, key):
                    return False
            elif key in self.exclude_modules or any(key.endswith(f".{e}") for e in self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            return re.fullmatch(self.target_modules, key) is not None
        if key in self.target_modules:
            return True
        if not any(key.endswith(f".{t}") for t in self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        index = _layer_index(key, self.layers_pattern)
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """(r, alpha) of module ``key`` after rank_pattern / alpha_pattern (first matching key wins)."""
        r = self.rank_pattern.get(_pattern_key(self.rank_pattern, key), self.r)
        alpha = self.alpha_pattern.get(_pattern_key(self.alpha_pattern, key), self.lora_alpha)
        return r, alpha

    def scale(self, key: str) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def unmatched_targets(self, names: Iterable[str]) -> list[str]:
        """Entries of a list ``target_modules`` that match none of ``names`` (absent from the base)."""
        if isinstance(self.target_modules, str):
            return []
        names = list(names)
        return sorted(t for t in self.target_modules if not any(n == t or n.endswith(f".{t}") for n in names))


def _layer_index(key: str, layers_pattern: tuple[str, ...]) -> int | None:
    """Index of the first numbered segment (or the one after ``layers_pattern``), as PEFT does."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return int(match.group("idx")) if match else None


def _pattern_key(patterns: dict[str, Any], key: str) -> str:
    """peft.utils.other.get_pattern_key: the first pattern that matches a dotted suffix of ``key``."""
    for pattern in patterns:
        if re.match(rf"(.*\.)?({pattern})$", key):
            return pattern
    return key


def parse_lora_config(raw: Any) -> LoraConfigView:
    """Validates a decoded ``adapter_config.json``; raises AdapterError naming the offending key."""
    if not isinstance(raw, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    _refuse_unsupported(raw)
    targets = _target_modules(raw.get("target_modules"))
    exclude = raw.get("exclude_modules")
    if isinstance(exclude, str):
        _check_regex("exclude_modules", exclude)
    elif exclude is not None:
        exclude = frozenset(exclude)
    layers = raw.get("layers_to_transform")
    if isinstance(layers, list):
        layers = frozenset(int(i) for i in layers) if layers else None
    pattern = raw.get("layers_pattern") or ()
    r, alpha, rank_pattern, alpha_pattern = _ranks_and_alphas(raw)
    return LoraConfigView(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        exclude_modules=exclude or None,
        layers_to_transform=layers,
        layers_pattern=(pattern,) if isinstance(pattern, str) else tuple(pattern),
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        use_rslora=bool(raw.get("use_rslora", False)),
        use_dora=bool(raw.get("use_dora", False)),
        lora_bias=bool(raw.get("lora_bias", False)),
    )


def _refuse_unsupported(raw: dict) -> None:
    """Options that change what the saved tensors mean, or that we cannot serve faithfully."""
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(
            f"adapter_config.json: unsupported peft_type {peft_type!r} (only 'LORA' is served)"
        )
    for key in _MUST_BE_OFF:
        if raw.get(key) not in (None, False, [], {}, ""):
            raise AdapterError(f"adapter_config.json: unsupported option {key}={raw[key]!r}")
    if raw.get("bias", "none") != "none":
        raise AdapterError(
            f"adapter_config.json: unsupported option bias={raw['bias']!r} (it retrains base biases); "
            "only bias='none' is served (lora_bias=true is supported)"
        )
    init = raw.get("init_lora_weights")
    if isinstance(init, str) and init.lower().startswith(_BASE_MUTATING_INITS):
        raise AdapterError(
            f"adapter_config.json: init_lora_weights={init!r} changes the base weights; convert the adapter "
            "to a plain LoRA first (PEFT's path_initial_model_for_weight_conversion)"
        )
    if raw.get("use_dora") and raw.get("lora_bias"):
        raise AdapterError(
            "adapter_config.json: use_dora together with lora_bias is not supported "
            "(PEFT's own forward and merge disagree on it)"
        )


def _target_modules(target_modules: Any) -> str | frozenset[str]:
    """A list of module-name suffixes, or one regex matched against full module names."""
    if (
        isinstance(target_modules, list)
        and target_modules
        and all(isinstance(t, str) for t in target_modules)
    ):
        return frozenset(target_modules)
    if isinstance(target_modules, str) and target_modules:
        _check_regex("target_modules", target_modules)
        return target_modules
    raise AdapterError(
        f"adapter_config.json: target_modules must be a non-empty list or regex, got {target_modules!r}"
    )


def _ranks_and_alphas(raw: dict) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``r``, ``lora_alpha`` (default: r) and their per-module patterns, each checked."""
    rank_pattern = dict(raw.get("rank_pattern") or {})
    alpha_pattern = dict(raw.get("alpha_pattern") or {})
    r = raw.get("r")
    alpha = raw.get("lora_alpha", r)
    for name, value in [("r", r), *((f"rank_pattern[{k!r}]", v) for k, v in rank_pattern.items())]:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise AdapterError(f"adapter_config.json: {name} must be a positive integer, got {value!r}")
    for name, value in [
        ("lora_alpha", alpha),
        *((f"alpha_pattern[{k!r}]", v) for k, v in alpha_pattern.items()),
    ]:
        if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
            raise AdapterError(f"adapter_config.json: {name} must be a finite number, got {value!r}")
    return r, float(alpha), rank_pattern, {k: float(v) for k, v in alpha_pattern.items()}


def _check_regex(option: str, pattern: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise AdapterError(f"adapter_config.json: {option} is not a valid regex ({exc})") from None
