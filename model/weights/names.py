"""Tensor names of the DiT in each layout it is published in, and the error every weight loader raises.

Wan2.2-S2V original names (`blocks.0.self_attn.q.weight`, `head.head.weight`), diffusers
`WanS2VTransformer3DModel` names, and ours (`AvatarDiT`: the backbone as diffusers, the S2V parts as Wan2.2).
Kept apart from `checkpoint.py` (files and assignment) so that `lora.py`, which `checkpoint.py` uses, can
name tensors without importing it.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence

SHOW_KEYS = 5  # how many keys an error message lists


class CheckpointError(RuntimeError):
    """A checkpoint file is missing or does not fit the model; the message names the file and keys."""


# ----------------------------------------------------------------------------- names

_ORIGINAL_TO_OURS = [
    (r"^time_embedding\.0\.", "condition_embedder.time_embedder.linear_1."),
    (r"^time_embedding\.2\.", "condition_embedder.time_embedder.linear_2."),
    (r"^text_embedding\.0\.", "condition_embedder.text_embedder.linear_1."),
    (r"^text_embedding\.2\.", "condition_embedder.text_embedder.linear_2."),
    (r"^time_projection\.1\.", "condition_embedder.time_proj."),
    (r"^head\.modulation$", "scale_shift_table"),
    (r"^head\.head\.", "proj_out."),
    (r"^blocks\.(\d+)\.modulation$", r"blocks.\1.scale_shift_table"),
    (r"^blocks\.(\d+)\.norm3\.", r"blocks.\1.norm2."),  # Wan's cross-attn norm is norm3, diffusers' norm2
    (r"^blocks\.(\d+)\.ffn\.0\.", r"blocks.\1.ffn.net.0.proj."),
    (r"^blocks\.(\d+)\.ffn\.2\.", r"blocks.\1.ffn.net.2."),
    (r"^blocks\.(\d+)\.self_attn\.", r"blocks.\1.attn1."),
    (r"^blocks\.(\d+)\.cross_attn\.", r"blocks.\1.attn2."),
]
_OURS_TO_ORIGINAL = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
    (r"^blocks\.(\d+)\.attn1\.", r"blocks.\1.self_attn."),
    (r"^blocks\.(\d+)\.attn2\.", r"blocks.\1.cross_attn."),
]
_ATTN_PARENT = r"((?:self_attn|cross_attn|attn1|attn2|injector\.\d+))"


def rename_key(key: str, table: Sequence[tuple[str, str]]) -> str:
    """Apply a table of (regex, replacement) renames in order: every layout mapping is such a table."""
    for pattern, repl in table:
        key = re.sub(pattern, repl, key)
    return key


def original_to_ours(key: str) -> str:
    """Wan2.2-S2V checkpoint name -> AvatarDiT (diffusers-style) parameter name."""
    key = rename_key(key, _ORIGINAL_TO_OURS)
    key = re.sub(_ATTN_PARENT + r"\.([qkv])\.", r"\1.to_\2.", key)
    return re.sub(_ATTN_PARENT + r"\.o\.", r"\1.to_out.0.", key)


def ours_to_original(key: str) -> str:
    """AvatarDiT parameter name -> the Wan2.2-S2V checkpoint name (inverse of `original_to_ours`)."""
    key = re.sub(_ATTN_PARENT + r"\.to_([qkv])\.", r"\1.\2.", key)
    key = re.sub(_ATTN_PARENT + r"\.to_out\.0\.", r"\1.o.", key)
    return rename_key(key, _OURS_TO_ORIGINAL)


# diffusers WanS2VTransformer3DModel names of the S2V parts -> ours (the backbone names are already shared).
_DIFFUSERS_TO_OURS = [
    (r"^condition_embedder\.ca(?:us|su)al_audio_encoder\.", "casual_audio_encoder."),  # both spellings seen
    (r"^condition_embedder\.pose_embedder\.", "cond_encoder."),
    (r"^trainable_condition_mask\.", "trainable_cond_mask."),
]
_OURS_TO_DIFFUSERS = [
    (r"^casual_audio_encoder\.", "condition_embedder.causal_audio_encoder."),
    (r"^cond_encoder\.", "condition_embedder.pose_embedder."),
    (r"^trainable_cond_mask\.", "trainable_condition_mask."),
]


def diffusers_to_ours(key: str) -> str:
    """diffusers `WanS2VTransformer3DModel` parameter name -> AvatarDiT name (ours pass through unchanged)."""
    return rename_key(key, _DIFFUSERS_TO_OURS)


def ours_to_diffusers(key: str) -> str:
    """AvatarDiT parameter name -> diffusers `WanS2VTransformer3DModel` name (inverse of `diffusers_to_ours`)."""
    return rename_key(key, _OURS_TO_DIFFUSERS)


def detect_renamer(keys: Iterable[str]) -> tuple[str, Callable[[str], str]]:
    """(layout name, renamer to ours) of a checkpoint from its keys: diffusers names, else Wan2.2's."""
    keys = list(keys)
    if any(".attn1." in k or k.startswith("condition_embedder.") for k in keys):
        return "diffusers", diffusers_to_ours
    return "original", original_to_ours
