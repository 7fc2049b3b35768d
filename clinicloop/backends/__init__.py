"""What serves a model: the engines (embedded llama.cpp, an OpenAI-compatible upstream, a managed
vLLM), the model registry, and the memory planner."""
