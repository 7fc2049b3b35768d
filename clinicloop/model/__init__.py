"""The tiny offline chat model: corpus, tokenizer, training and GGUF export."""
