"""How a model becomes tensors: metadata readers and the transformers loader."""
