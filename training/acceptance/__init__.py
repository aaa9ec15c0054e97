"""Acceptance checks for a freshly trained tiny avatar bundle (`model/assets/tiny_avatar.safetensors`).

They need the trained bundle, so they live outside `tests/` until a bundle that passes them is committed
as the default: run `make accept-tiny` after `make train-tiny`; once they pass, the bundle and these files
move into the repository's default test suite.
"""
