"""Property-based run of schemathesis against our own OpenAPI spec: no generated input may cause a 5xx.

Bounded (few examples per operation, a 64-token context) so the whole run stays well under a minute.
The key is an admin key, so mutations are explored too - against a throwaway store. Hypothesis drives
``operation.as_strategy()`` directly because schemathesis' pytest fixture integration does not run
under pytest 9.
"""

from __future__ import annotations

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error

from server.config import Settings
from tests.api_harness import LiveServer, copy_model_with_chat_template
from tests.lora_fixtures import make_peft_adapter

ADMIN = "sk-schemathesis-admin"


@pytest.fixture(scope="module")
def live(tmp_path_factory, tiny_llama_dir):
    root = tmp_path_factory.mktemp("api_schemathesis")
    model_dir = copy_model_with_chat_template(tiny_llama_dir, root / "model")
    adapter = make_peft_adapter(model_dir, root / "made", r=4, seed=2)
    shutil.copytree(adapter, root / "store" / "a1")
    settings_ = Settings(
        model=model_dir,
        served_model_name="tiny",
        adapter_store=root / "store",
        export_dir=root / "exports",
        allowed_lora_roots=[root / "made"],
        device="cpu",
        num_kv_blocks=128,
        max_model_len=64,
        admin_keys=[ADMIN],
        max_body_bytes=64 * 1024,
    )
    with LiveServer(settings_) as srv:
        yield srv


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=lambda m: m.value)
def test_no_server_errors(live, mode):
    """Every operation, schema-valid (positive) and schema-violating (negative) inputs.

    Driven through Hypothesis directly (``operation.as_strategy``), one bounded run per operation,
    so failures name the operation and its minimal failing case.
    """
    api = schemathesis.openapi.from_url(f"{live.url}/openapi.json")
    headers = {"Authorization": f"Bearer {ADMIN}"}
    failures = []
    for result in api.get_all_operations():
        operation = result.ok()

        @settings(
            max_examples=8,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy(generation_mode=mode))
        def check(case) -> None:
            case.call_and_validate(
                base_url=live.url, headers=headers, checks=[not_a_server_error], timeout=30
            )

        try:
            check()
        except Unsatisfiable:  # nothing to violate (no parameters, or unconstrained strings)
            assert mode is GenerationMode.NEGATIVE, operation.label
        except Exception as exc:  # collect all operations' failures, then report them together
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
