"""Condition encoders: wav2vec2 speech features and the umT5 prompt encoder (transformers wrappers)."""
