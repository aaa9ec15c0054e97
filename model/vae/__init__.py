"""The Wan2.1 VAE: reference-image encode, the per-session streaming decode, and its faster CPU paths."""
