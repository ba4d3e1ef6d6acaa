"""The generation engine: prompt rendering, the prefill/decode loop, sampling, text out."""
