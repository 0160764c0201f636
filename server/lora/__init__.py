"""Multi-LoRA core: PEFT adapters validated and batched together in one mixed forward.

adapter/peft_config/spec  parse + validate PEFT LoRA (incl. rsLoRA, patterns, DoRA, lora_bias)
layers/batch/ops          LoRALinear with stacked slot buffers; the SGMV op (torch reference, Triton)
compose/merge             weighted composition (rank concat) and merging into the base weights
host/slots/manager        residency: store -> host LRU -> device slots with pins; the scheduler gate
setup                     the engine's entry point (build_lora)
"""
