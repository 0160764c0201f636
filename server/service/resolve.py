"""Which weights a request's ``model`` (and the ``adapters`` composition extension) asks for."""

from __future__ import annotations

from collections.abc import Callable

from server.lora.ref import AdapterRef
from server.service.errors import AdapterNotFoundError, InvalidAdapterError
from server.service.paths import check_name
from server.store import is_valid_adapter_name


def not_found(name: str, param: str = "model") -> AdapterNotFoundError:
    return AdapterNotFoundError(f"The model `{name}` does not exist.", param)


def resolve_model(
    model: str,
    composition: dict[str, float] | None,
    base_name: str,
    merged_adapter: str | None,
    exists: Callable[[str], bool],
) -> AdapterRef | None:
    """None for the base model (or the adapter merged into it), else the adapter or composition.

    An invalid or unknown name is "does not exist", like OpenAI's answer for an unknown model.
    """
    if composition:
        if model != base_name:
            raise InvalidAdapterError(
                f"with 'adapters', 'model' must be the base model '{base_name}'", "model"
            )
        for name in composition:
            check_name(name, "adapters")
            if not exists(name):
                raise not_found(name, "adapters")
        return AdapterRef(weights=dict(composition))
    if model == base_name or (merged_adapter is not None and model == merged_adapter):
        return None  # the merged adapter is folded into the base weights: zero LoRA cost
    if not is_valid_adapter_name(model) or not exists(model):
        raise not_found(model)
    return AdapterRef(name=model)
