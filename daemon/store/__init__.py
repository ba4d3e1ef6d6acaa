"""What is on disk under OLLAMA_MODELS."""
