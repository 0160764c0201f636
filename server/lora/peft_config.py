"""``adapter_config.json`` of a PEFT LoRA adapter: parsed, refused when unsupported, and queried.

The matching rules (``target_modules`` as list or regex, ``exclude_modules``, ``layers_to_transform``
with ``layers_pattern``, ``rank_pattern``/``alpha_pattern`` keys) mirror PEFT's own
(``peft.tuners.tuners_utils.check_target_module_exists`` and ``peft.utils.other.get_pattern_key``) so an
adapter means here exactly what it meant when it was trained. PEFT is not imported at serve time.

Those patterns come from whoever uploads the adapter, so their cost is bounded (:class:`MatchBudget`):
a length cap, a cap on fixed repeat counts (which the ``regex`` module expands when compiling), and
every match run by ``regex`` with the GIL released and a timeout out of one budget per adapter. A
catastrophically backtracking pattern is refused with a 400 naming it, instead of stalling the server.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import regex

from server.lora.errors import AdapterError

MAX_PATTERN_CHARS = 4096
MAX_REPEAT_EXPANSION = 10_000  # product of the patterns' {m,n} minimums
# CPU time all regex matching of one adapter against the base model's module names may take (a real
# config needs milliseconds; ``regex`` overshoots a timeout by up to ~3x, still well under a second).
MATCH_BUDGET_S = 0.25
_REPEAT = re.compile(r"\{(\d+)(?:,\d*)?\}")
_ESCAPE = re.compile(r"\\.", re.DOTALL)


class PatternError(AdapterError):
    """A pattern of adapter_config.json is refused: too long, too costly to compile or to match."""


class MatchBudget:
    """Time all regex matches of one adapter config may take together.

    Each match runs in the ``regex`` module with ``concurrent=True`` (the GIL is released, so other
    threads - the event loop - keep running) and a timeout of what is left; when it runs out, the
    pattern being matched is refused. Spent time is this thread's CPU time, so waiting for the GIL on
    a busy server never counts against a legitimate adapter.
    """

    def __init__(self, seconds: float = MATCH_BUDGET_S) -> None:
        self.seconds = seconds
        self.left = seconds

    def match(self, option: str, pattern: str, key: str, full_regex: str | None = None) -> regex.Match | None:
        """``full_regex`` matched at the start of ``key`` (default: ``pattern`` itself, full match);
        ``option`` and ``pattern`` name what is refused if the budget runs out."""
        start = time.thread_time()
        try:
            if self.left <= 0:
                raise TimeoutError
            if full_regex is None:
                return regex.fullmatch(pattern, key, timeout=self.left, concurrent=True)
            return regex.match(full_regex, key, timeout=self.left, concurrent=True)
        except regex.error as exc:
            raise PatternError(
                f"adapter_config.json: {option} pattern {pattern!r} is not valid here ({exc})"
            ) from None
        except TimeoutError:
            raise PatternError(
                f"adapter_config.json: {option} pattern {pattern!r} takes over {self.seconds:g} s to match "
                "the base model's module names (catastrophic backtracking?); simplify it"
            ) from None
        finally:
            self.left -= time.thread_time() - start


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
    budget: MatchBudget = field(default_factory=MatchBudget, compare=False, repr=False)

    def targets(self, key: str) -> bool:
        """Whether PEFT would put a LoRA on the module named ``key`` (check_target_module_exists)."""
        if self.exclude_modules:
            if isinstance(self.exclude_modules, str):
                if self.budget.match("exclude_modules", self.exclude_modules, key) is not None:
                    return False
            elif key in self.exclude_modules or _ends_with_any(key, self.exclude_modules):
                return False
        if isinstance(self.target_modules, str):
            return self.budget.match("target_modules", self.target_modules, key) is not None
        if key in self.target_modules:
            return True
        if not _ends_with_any(key, self.target_modules):
            return False
        if self.layers_to_transform is None:
            return True
        index = self._layer_index(key)
        if index is None:
            return False
        if isinstance(self.layers_to_transform, int):
            return index == self.layers_to_transform
        return index in self.layers_to_transform

    def rank_and_alpha(self, key: str) -> tuple[int, float]:
        """(r, alpha) of module ``key`` after rank_pattern / alpha_pattern (first matching key wins)."""
        r = self.rank_pattern.get(self._pattern_key("rank_pattern", self.rank_pattern, key), self.r)
        alpha_key = self._pattern_key("alpha_pattern", self.alpha_pattern, key)
        return r, self.alpha_pattern.get(alpha_key, self.lora_alpha)

    def scale(self, key: str) -> float:
        """PEFT's ``scaling``: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        r, alpha = self.rank_and_alpha(key)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r

    def unmatched_targets(self, names: Iterable[str]) -> list[str]:
        """Entries of a list ``target_modules`` that match none of ``names`` (absent from the base)."""
        if isinstance(self.target_modules, str):
            return []
        suffixes = {suffix for n in names for suffix in (n, *_dotted_suffixes(n))}
        return sorted(t for t in self.target_modules if t not in suffixes)

    def _layer_index(self, key: str) -> int | None:
        """Index of the first numbered segment (or the one after ``layers_pattern``), as PEFT does."""
        if not self.layers_pattern:
            match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
            return int(match.group("idx")) if match else None
        for pattern in self.layers_pattern:
            match = self.budget.match(
                "layers_pattern", pattern, key, rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\."
            )
            if match is not None:
                return int(match.group("idx"))
        return None

    def _pattern_key(self, option: str, patterns: dict[str, Any], key: str) -> str:
        """peft.utils.other.get_pattern_key: the first pattern that matches a dotted suffix of ``key``."""
        for pattern in patterns:
            if self.budget.match(option, pattern, key, rf"(.*\.)?({pattern})$") is not None:
                return pattern
        return key


def _dotted_suffixes(key: str) -> list[str]:
    """``a.b.c`` -> ``["b.c", "c"]``: t is one of them exactly when ``key.endswith("." + t)``."""
    return [key[i + 1 :] for i, char in enumerate(key) if char == "."]


def _ends_with_any(key: str, names: frozenset[str]) -> bool:
    """PEFT's ``any(key.endswith(f".{t}") for t in names)`` in time linear in ``key``, not in ``names``."""
    return any(suffix in names for suffix in _dotted_suffixes(key))


def parse_lora_config(raw: Any) -> LoraConfigView:
    """Validates a decoded ``adapter_config.json``; raises AdapterError naming the offending key."""
    if not isinstance(raw, dict):
        raise AdapterError("adapter_config.json must hold a JSON object")
    _refuse_unsupported(raw)
    targets = _target_modules(raw.get("target_modules"))
    exclude = _exclude_modules(raw.get("exclude_modules"))
    layers = _layers_to_transform(raw.get("layers_to_transform"))
    layers_pattern = _layers_pattern(raw.get("layers_pattern"))
    r, alpha, rank_pattern, alpha_pattern = _ranks_and_alphas(raw)
    return LoraConfigView(
        r=r,
        lora_alpha=alpha,
        target_modules=targets,
        exclude_modules=exclude,
        layers_to_transform=layers,
        layers_pattern=layers_pattern,
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


def _exclude_modules(exclude: Any) -> str | frozenset[str] | None:
    if not exclude:
        return None
    if isinstance(exclude, str):
        _check_regex("exclude_modules", exclude)
        return exclude
    if isinstance(exclude, list) and all(isinstance(e, str) for e in exclude):
        return frozenset(exclude)
    raise AdapterError(f"adapter_config.json: exclude_modules must be a list or regex, got {exclude!r}")


def _layers_to_transform(layers: Any) -> int | frozenset[int] | None:
    def is_int(i: Any) -> bool:
        return isinstance(i, int) and not isinstance(i, bool)

    if layers is None or layers == []:
        return None
    if is_int(layers):
        return layers
    if isinstance(layers, list) and all(is_int(i) for i in layers):
        return frozenset(layers)
    raise AdapterError(
        f"adapter_config.json: layers_to_transform must be an integer or a list of them, got {layers!r}"
    )


def _layers_pattern(pattern: Any) -> tuple[str, ...]:
    if not pattern:
        return ()
    patterns = [pattern] if isinstance(pattern, str) else pattern
    if not isinstance(patterns, list) or not all(isinstance(p, str) for p in patterns):
        raise AdapterError(f"adapter_config.json: layers_pattern must be a string or a list, got {pattern!r}")
    for p in patterns:
        _check_regex("layers_pattern", p)
    return tuple(patterns)


def _pattern_dict(raw: dict, option: str) -> dict:
    patterns = raw.get(option) or {}
    if not isinstance(patterns, dict):
        raise AdapterError(f"adapter_config.json: {option} must be an object, got {patterns!r}")
    for key in patterns:
        _check_regex(f"{option} key", key)
    return dict(patterns)


def _ranks_and_alphas(raw: dict) -> tuple[int, float, dict[str, int], dict[str, float]]:
    """``r``, ``lora_alpha`` (default: r) and their per-module patterns, each checked."""
    rank_pattern = _pattern_dict(raw, "rank_pattern")
    alpha_pattern = _pattern_dict(raw, "alpha_pattern")
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
    """Valid for PEFT (``re``) and for our matcher (``regex``), and cheap to compile: bounded length
    and fixed repeat counts (``regex`` expands ``(?:a{1000}){1000}`` for seconds while compiling)."""
    shown = repr(pattern if len(pattern) <= 200 else pattern[:200] + "...")
    if len(pattern) > MAX_PATTERN_CHARS:
        raise PatternError(
            f"adapter_config.json: {option} pattern {shown} is {len(pattern)} characters long, over the "
            f"limit of {MAX_PATTERN_CHARS}"
        )
    counts = _REPEAT.findall(_ESCAPE.sub("", pattern))
    if math.prod(max(1, int(c) if len(c) <= 6 else 10**6) for c in counts) > MAX_REPEAT_EXPANSION:
        raise PatternError(
            f"adapter_config.json: {option} pattern {shown} repeats too much (the product of its repeat "
            f"counts is over {MAX_REPEAT_EXPANSION})"
        )
    try:
        re.compile(pattern)
        regex.compile(pattern)
    except (re.error, regex.error) as exc:
        raise AdapterError(f"adapter_config.json: {option} is not a valid regex: {shown} ({exc})") from None
