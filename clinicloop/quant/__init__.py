"""Quantization and deployment sizing: the GPU memory planner, HF -> GGUF K-quants (llama.cpp),
and W4A16 AWQ / GPTQ checkpoints for vLLM (llm-compressor)."""
