"""hfollama: an Ollama-compatible model daemon on Hugging Face transformers."""

# Reported by /api/version. Clients (Open WebUI, the Go CLI) gate features on a numeric
# dotted version close to Ollama's own, so this tracks the Ollama API level we implement,
# not the hfollama package version.
OLLAMA_API_VERSION = "0.32.15"
__version__ = "0.1.0"
