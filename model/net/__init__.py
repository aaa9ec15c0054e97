"""The audio-conditioned DiT and its parts: blocks and the attention seam, RoPE, audio injection, FramePack motion, float8 layers."""
