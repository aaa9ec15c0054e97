"""The talking-avatar model: audio-conditioned DiT, streaming VAE decode, encoders, sampler, weights."""
