"""Mixed-batch LoRA kernels as plain functions (torch reference, Triton SGMV); the backend objects in
``server.lora.backend`` choose one per process and call it with the step's ``LoRABatch``."""
