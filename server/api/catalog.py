"""Which models a caller can address: the base model and the adapters, filtered by their key.

Adapters come from two places - the store, and paths registered at runtime through vLLM's
``/v1/load_lora_adapter`` - and the engine's adapter manager knows both.
"""

from __future__ import annotations

from server.api.auth import Principal
from server.api.errors import APIError
from server.engine.types import AdapterRef
from server.store import AdapterStore, InvalidAdapterNameError, check_adapter_name


def adapter_names(engine, store: AdapterStore) -> list[str]:
    names = set(store.names())
    if engine is not None and engine.adapters is not None:
        names.update(engine.adapters.list_names())
    return sorted(names)


def resident_names(engine) -> set[str]:
    return set(engine.stats().resident_adapters) if engine is not None else set()


def not_found(name: str, param: str = "model") -> APIError:
    return APIError(404, f"The model `{name}` does not exist.", param=param)


def resolve_model(
    engine, principal: Principal, model: str, adapters: dict[str, float] | None
) -> tuple[AdapterRef | None, list[str]]:
    """Maps ``model`` (+ the ``adapters`` composition field) to an AdapterRef and metric labels.

    A name the key may not use is reported exactly like a missing one, so tenants cannot probe
    each other's adapter names.
    """
    if adapters:
        if model != engine.model_name:
            raise APIError(
                400, f"with 'adapters', 'model' must be the base model '{engine.model_name}'", param="model"
            )
        for name in adapters:
            try:
                check_adapter_name(name)
            except InvalidAdapterNameError as exc:
                raise APIError(400, str(exc), param="adapters") from None
            if not principal.can_use(name):
                raise not_found(name, "adapters")
        return AdapterRef(weights=dict(adapters)), list(adapters)
    if model == engine.model_name:
        return None, [""]
    try:
        check_adapter_name(model)
    except InvalidAdapterNameError:
        raise not_found(model) from None
    if not principal.can_use(model):
        raise not_found(model)
    return AdapterRef(name=model), [model]
