"""Multi-LoRA core: PEFT adapters validated and batched together in one mixed forward.

ref                         AdapterRef: which weights a request runs with (a name or a composition)
peft_config/adapter/spec    parse + validate PEFT LoRA (rsLoRA, patterns, DoRA, lora_bias) vs the base
slot_weights/layers         LoRALinear with stacked per-slot weights; injection into an HF model
batch/backend/ops           per-step segment metadata; the backend object (torch, Triton) and its SGMV
compose/merge               weighted composition (rank concat); merging into the base weights
catalog/reader/host_cache   residency: where files are -> parsed once -> host LRU, loaded in background
slot_table/manager          device slots with LRU and pins (the engine's AdapterSlots protocol)
setup                       builds all of the above from Settings (build_lora)

Imports point down only: nothing here imports ``server.engine`` or ``server.api``.
"""
