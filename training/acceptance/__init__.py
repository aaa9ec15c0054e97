"""Acceptance checks a trained tiny avatar bundle must pass before it counts as done.

The held-out lip-sync part (>= 0.7 at lag 0 or +-1 frame) is met by the bundle shipped now and runs in the
default suite (`tests/training/test_heldout_lip_sync.py`); the identity part (PSNR > 20 dB) is not (13-19 dB:
the streaming VAE decoder washes the colours out after the first clip), so `make accept-tiny` still fails.
"""
