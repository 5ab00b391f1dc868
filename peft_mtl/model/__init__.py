"""The model: backbone, LoRA adapters, heads, the multi-task model, CPU kernels."""
