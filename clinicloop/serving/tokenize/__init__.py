"""POST /tokenize and /detokenize: the served model's tokenizer, in vLLM's shapes."""
