"""PEFT adapter parsing: PEFT's matching semantics, scales, and every malformed adapter refused precisely."""

from __future__ import annotations

import gc
import json
import math
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import server.lora.adapter as adapter_module
from server.lora.adapter import AdapterError, load_peft_adapter, max_bytes_for
from server.lora.peft_config import parse_lora_config
from server.lora.spec import BaseModelSpec
from tests.lora_fixtures import (
    ALL_LINEAR,
    load_base,
    make_peft_adapter,
)

PREFIX = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.fixture(scope="module")
def spec(tiny_llama_dir) -> BaseModelSpec:
    return BaseModelSpec.from_model(load_base(tiny_llama_dir))


@pytest.fixture(scope="module")
def good(tiny_llama_dir, tmp_path_factory) -> Path:
    return make_peft_adapter(tiny_llama_dir, tmp_path_factory.mktemp("good") / "a", r=8, seed=1)


@pytest.fixture
def copy(good, tmp_path):
    """A fresh copy of the good adapter to break."""

    def _copy() -> Path:
        dst = tmp_path / "broken"
        shutil.copytree(good, dst)
        return dst

    return _copy


def _edit_config(path: Path, **changes) -> None:
    config = json.loads((path / "adapter_config.json").read_text())
    config.update(changes)
    (path / "adapter_config.json").write_text(json.dumps(config))


def _edit_tensors(path: Path, edit) -> None:
    tensors = load_file(path / "adapter_model.safetensors")
    edit(tensors)
    save_file(tensors, path / "adapter_model.safetensors")


def test_spec_lists_targetable_linears_but_not_lm_head(spec):
    assert len(spec.linears) == 14 and "lm_head" not in spec.linears
    assert spec.other_modules["lm_head"] == "lm_head"
    assert spec.other_modules["model.embed_tokens"] == "Embedding"
    q = spec.linears["model.layers.0.self_attn.q_proj"]
    assert (q.in_features, q.out_features, q.transposed, q.has_bias) == (64, 64, False, False)


def test_good_adapter_loads_with_peft_names_and_scales(good, spec):
    adapter = load_peft_adapter(good, "good", spec, max_rank=64)
    assert sorted(adapter.modules) == sorted(
        n for n in spec.linears if n.split(".")[-1].endswith(("q_proj", "k_proj", "v_proj", "o_proj"))
    )
    q = adapter.modules["model.layers.0.self_attn.q_proj"]
    assert (
        q.rank == 8 and q.scale == 2.0 and q.a.dtype == torch.float32 and q.bias is None and q.dora_g is None
    )


@pytest.mark.parametrize(
    "config",
    [
        dict(target_modules=["q_proj", "down_proj"]),
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=[1]),
        dict(target_modules=["q_proj", "up_proj"], layers_to_transform=0, layers_pattern="layers"),
        dict(target_modules=r".*\.(0|1)\.self_attn\.(q|v)_proj"),
        dict(target_modules=ALL_LINEAR, exclude_modules=["k_proj"]),
        dict(target_modules=ALL_LINEAR, exclude_modules=r".*mlp.*"),
        dict(target_modules=["model.layers.1.mlp.gate_proj", "v_proj"]),
        dict(
            target_modules=["self_attn.q_proj", "mlp.down_proj"], exclude_modules=["layers.0.mlp.down_proj"]
        ),
        dict(target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 1], layers_pattern=["h", "layers"]),
    ],
)
def test_target_matching_equals_peft(config, spec, tmp_path):
    from peft import LoraConfig
    from peft.tuners.tuners_utils import check_target_module_exists

    peft_config = LoraConfig(r=4, **config)
    peft_config.save_pretrained(tmp_path)  # the JSON exactly as PEFT writes it
    ours = parse_lora_config(json.loads((tmp_path / "adapter_config.json").read_text()))
    names = list(spec.linears) + list(spec.other_modules)
    for name in names:
        assert bool(ours.targets(name)) == bool(check_target_module_exists(peft_config, name)), name


def test_rank_alpha_patterns_and_rslora_equal_peft(tiny_llama_dir, tmp_path, spec):
    from peft import PeftModel

    kwargs = dict(
        r=16,
        lora_alpha=8,
        target_modules=ALL_LINEAR,
        use_rslora=True,
        rank_pattern={"v_proj": 4, "layers.1.mlp.down_proj": 8, r"layers\.0\.self_attn\.o_proj": 2},
        alpha_pattern={"q_proj": 5, "model.layers.0.mlp.up_proj": 64},
    )
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "p", **kwargs)
    adapter = load_peft_adapter(path, "p", spec, max_rank=16)
    peft = PeftModel.from_pretrained(load_base(tiny_llama_dir), path)
    for name, weights in adapter.modules.items():
        peft_layer = peft.base_model.model.get_submodule(name)
        assert weights.rank == peft_layer.r["default"], name
        assert math.isclose(weights.scale, peft_layer.scaling["default"], rel_tol=1e-12), name


def test_dora_rescale_equals_peft_magnitude_over_norm(tiny_llama_dir, tmp_path, spec):
    from peft import PeftModel

    path = make_peft_adapter(tiny_llama_dir, tmp_path / "d", r=8, use_dora=True, target_modules=["v_proj"])
    adapter = load_peft_adapter(path, "d", spec, max_rank=8)
    peft = PeftModel.from_pretrained(load_base(tiny_llama_dir), path)
    name = "model.layers.1.self_attn.v_proj"
    layer = peft.base_model.model.get_submodule(name)
    dora = layer.lora_magnitude_vector["default"]
    with torch.no_grad():
        delta = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
        norm = dora.get_weight_norm(layer.base_layer.weight, delta, layer.scaling["default"])
    torch.testing.assert_close(adapter.modules[name].dora_g, dora.weight / norm)


# --- malformed adapters ---------------------------------------------------------------------------


def test_refuses_wrong_shape(copy, spec):
    path = copy()
    _edit_tensors(path, lambda t: t.update({f"{PREFIX}.lora_A.weight": torch.randn(8, 48)}))
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight has shape \[8, 48\], expected \[8, 64\]"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_adapter_trained_for_another_model_shape(tiny_llama_dir, tmp_path, spec):
    from tests.model_factory import make_tiny_model

    other = make_tiny_model(tmp_path / "wide", "llama", hidden_size=96)
    path = make_peft_adapter(other, tmp_path / "a", r=4)
    with pytest.raises(AdapterError, match=r"expected \[4, 64\]"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_rank_above_max(good, spec):
    with pytest.raises(AdapterError, match="rank 8 exceeds max_lora_rank=4"):
        load_peft_adapter(good, "x", spec, 4)


def test_float16_slots_refuse_an_adapter_past_its_range(tiny_llama_dir, good, copy, spec):
    """lora_dtype=float16 holds at most 65504 once scaled by alpha/r: such an adapter is refused when
    read (one request fails), not written as inf into a slot every row of its batch reads."""
    from server.lora.backend import make_lora_backend
    from server.lora.layers import inject_lora
    from tests.lora_fixtures import load_base

    lora = inject_lora(
        load_base(tiny_llama_dir), make_lora_backend("torch", "cpu", 2), 64, dtype=torch.float16
    )
    lora.check(load_peft_adapter(good, "fine", spec, 64))
    path = copy()
    _edit_tensors(path, lambda t: t.update({f"{PREFIX}.lora_B.weight": torch.full((64, 8), 7e4)}))
    with pytest.raises(AdapterError, match="q_proj' has weights .* past float16's range"):
        lora.check(load_peft_adapter(path, "huge", spec, 64))


def test_refuses_config_rank_that_disagrees_with_tensors(copy, spec):
    path = copy()
    _edit_config(path, rank_pattern={"q_proj": 4})
    with pytest.raises(AdapterError, match=r"q_proj.lora_A.weight has shape \[8, 64\], expected \[4, 64\]"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_absent_target_module(copy, spec):
    path = copy()
    _edit_config(path, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "c_attn"])
    with pytest.raises(AdapterError, match=r"target modules \['c_attn'\] are absent from the base model"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_tensors_for_a_module_the_base_lacks(copy, spec):
    path = copy()
    bad = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    _edit_tensors(path, lambda t: t.update({bad: torch.randn(8, 64)}))
    with pytest.raises(AdapterError, match="'model.layers.7.self_attn.q_proj' is absent from the base model"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_pickle_bin_only(tiny_llama_dir, tmp_path, spec):
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "p", r=4, safe_serialization=False)
    assert (path / "adapter_model.bin").exists() and not (path / "adapter_model.safetensors").exists()
    with pytest.raises(AdapterError, match="refusing pickle weights adapter_model.bin"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_truncated_safetensors(copy, spec):
    path = copy()
    data = (path / "adapter_model.safetensors").read_bytes()
    (path / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="adapter_model.safetensors is corrupt or truncated"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_a_weights_file_larger_than_any_adapter_of_the_base_before_reading_it(copy, spec):
    path = copy()
    with (path / "adapter_model.safetensors").open("ab") as f:
        f.truncate(max_bytes_for(spec, 64) + 1)  # a valid header, then more bytes than any adapter needs
    with pytest.raises(
        AdapterError, match=r"bytes, more than an adapter of this base model at max_lora_rank"
    ):
        load_peft_adapter(path, "big", spec, max_rank=64)


def test_a_large_weights_file_is_memory_mapped_and_reads_the_same(good, spec, monkeypatch):
    whole = load_peft_adapter(good, "a", spec, max_rank=64)
    monkeypatch.setattr(adapter_module, "WHOLE_READ_MAX_BYTES", 0)  # every file counts as large
    mapped = load_peft_adapter(good, "a", spec, max_rank=64)
    assert whole.modules.keys() == mapped.modules.keys()
    for name, m in whole.modules.items():
        assert torch.equal(m.a, mapped.modules[name].a) and torch.equal(m.b, mapped.modules[name].b)


@pytest.mark.parametrize("large", [False, True])
def test_refuses_integer_tensors_naming_the_dtype_once(copy, spec, monkeypatch, large):
    path = copy()
    _edit_tensors(
        path, lambda t: t.__setitem__(f"{PREFIX}.lora_A.weight", t[f"{PREFIX}.lora_A.weight"].to(torch.int32))
    )
    if large:
        monkeypatch.setattr(adapter_module, "WHOLE_READ_MAX_BYTES", 0)
    with pytest.raises(
        AdapterError, match=r"q_proj.lora_A.weight' has dtype (I32|torch.int32); F64, F32, F16 or BF16"
    ) as info:
        load_peft_adapter(path, "x", spec, 64)
    assert str(info.value).count("adapter 'x'") == 1


def test_reading_an_adapter_again_and_again_keeps_no_memory(good, spec):
    """safetensors 0.8's ``safe_open(...).get_tensor`` kept ~50 bytes per call for good (a server loading
    adapters all day grew without bound): the reader parses through ``deserialize`` instead."""
    for _ in range(3):
        load_peft_adapter(good, "a", spec, max_rank=64)
    gc.collect()
    tracemalloc.start()
    try:
        for _ in range(200):
            load_peft_adapter(good, "a", spec, max_rank=64)
        gc.collect()
        kept, _ = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert kept < 64 << 10  # 227 KB through get_tensor, measured


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_refuses_non_finite_weights(copy, spec, value):
    path = copy()
    _edit_tensors(path, lambda t: t[f"{PREFIX}.lora_B.weight"].__setitem__((3, 1), value))
    with pytest.raises(AdapterError, match=r"q_proj.lora_B.weight' contains NaN or inf"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_modules_to_save(tiny_llama_dir, tmp_path, spec):
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "m", r=4, modules_to_save=["lm_head"])
    with pytest.raises(AdapterError, match=r"unsupported option modules_to_save=\['lm_head'\]"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_other_peft_types(tiny_llama_dir, tmp_path, spec):
    from peft import IA3Config, get_peft_model

    model = get_peft_model(
        load_base(tiny_llama_dir),
        IA3Config(target_modules=["k_proj", "down_proj"], feedforward_modules=["down_proj"]),
    )
    model.save_pretrained(tmp_path / "ia3")
    with pytest.raises(AdapterError, match="unsupported peft_type 'IA3'"):
        load_peft_adapter(tmp_path / "ia3", "x", spec, 64)


def test_refuses_missing_or_corrupt_config(copy, spec, tmp_path):
    path = copy()
    (path / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="adapter_config.json is not valid JSON"):
        load_peft_adapter(path, "x", spec, 64)
    (path / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="missing adapter_config.json"):
        load_peft_adapter(path, "x", spec, 64)
    with pytest.raises(AdapterError, match="does not exist"):
        load_peft_adapter(tmp_path / "nowhere", "x", spec, 64)


def test_refuses_missing_weights_file(copy, spec):
    path = copy()
    (path / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="missing adapter_model.safetensors"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_missing_and_unexpected_keys(copy, spec):
    path = copy()
    _edit_tensors(path, lambda t: t.pop(f"{PREFIX}.lora_B.weight"))
    with pytest.raises(AdapterError, match=f"missing tensor key '{PREFIX}.lora_B.weight'"):
        load_peft_adapter(path, "x", spec, 64)
    path = copy() if not path.exists() else path
    _edit_tensors(
        path,
        lambda t: t.update(
            {
                f"{PREFIX}.lora_B.weight": torch.zeros(64, 8),
                "base_model.model.model.norm.weight": torch.ones(64),
            }
        ),
    )
    with pytest.raises(AdapterError, match="unexpected tensor key 'base_model.model.model.norm.weight'"):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_tensors_the_config_does_not_target(copy, spec):
    path = copy()
    key = "base_model.model.model.layers.0.mlp.up_proj"
    _edit_tensors(
        path,
        lambda t: t.update(
            {f"{key}.lora_A.weight": torch.zeros(8, 64), f"{key}.lora_B.weight": torch.zeros(128, 8)}
        ),
    )
    with pytest.raises(
        AdapterError, match="'model.layers.0.mlp.up_proj' which adapter_config.json does not target"
    ):
        load_peft_adapter(path, "x", spec, 64)


def test_refuses_targeted_module_without_tensors(copy, spec):
    path = copy()
    _edit_tensors(path, lambda t: [t.pop(k) for k in list(t) if ".layers.1.self_attn.k_proj." in k])
    with pytest.raises(
        AdapterError, match="no tensors for targeted module 'model.layers.1.self_attn.k_proj'"
    ):
        load_peft_adapter(path, "x", spec, 64)


@pytest.mark.parametrize(
    "target,message",
    [(["embed_tokens"], "'model.embed_tokens' is a Embedding"), (["lm_head"], "'lm_head' is a lm_head")],
)
def test_refuses_embedding_and_lm_head_lora(tiny_llama_dir, tmp_path, spec, target, message):
    path = make_peft_adapter(tiny_llama_dir, tmp_path / "e", r=4, target_modules=target)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(path, "x", spec, 64)


@pytest.mark.parametrize(
    "changes,message",
    [
        (dict(bias="all"), "unsupported option bias='all'"),
        (dict(use_dora=True, lora_bias=True), "use_dora together with lora_bias"),
        (dict(init_lora_weights="pissa"), "init_lora_weights='pissa' changes the base weights"),
        (dict(target_parameters=["experts.gate_up_proj"]), "unsupported option target_parameters"),
        (dict(layer_replication=[[0, 2]]), "unsupported option layer_replication"),
        (dict(r=0), "r must be a positive integer"),
        (dict(target_modules="(unclosed"), "target_modules is not a valid regex"),
        (dict(target_modules=None), "target_modules must be a non-empty list or regex"),
    ],
)
def test_refuses_unsupported_options(copy, spec, changes, message):
    path = copy()
    _edit_config(path, **changes)
    with pytest.raises(AdapterError, match=message):
        load_peft_adapter(path, "x", spec, 64)
