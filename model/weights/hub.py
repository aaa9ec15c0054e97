"""Where the weights named by `--model.checkpoint` / `--model.lora` are: a path, or a Hugging Face hub id
found in the local hub cache, and what to tell the operator when they are nowhere.

A hub id (`Wan-AI/Wan2.2-S2V-14B`, `Quark-Vision/Live-Avatar`) is looked up with huggingface_hub in the hub
cache only (`local_files_only=True`: offline-safe, never a download; HF_HUB_CACHE / HF_HOME choose the cache),
then in `ckpt/LiveAvatar`, where LiveAvatar's own loader caches its LoRA. A value that exists as a path
(as given, or relative to the repository, where the presets point) always wins over a hub id.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from model.config import REPO_ROOT

PUBLISHED_BASE = "Wan-AI/Wan2.2-S2V-14B"  # the base model: DiT shards, VAE, umT5, wav2vec2
PUBLISHED_LORA = "Quark-Vision/Live-Avatar"  # LiveAvatar's LoRA
LORA_FILE = "liveavatar.safetensors"  # its file in that repository (LiveAvatar load_weight_utils.py)
LIVEAVATAR_CACHE = REPO_ROOT / "ckpt" / "LiveAvatar"  # hf_hub_download(cache_dir="ckpt/LiveAvatar") there
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")

DOWNLOAD_HELP = (
    f"The 14B preset needs the published weights (`pip install -U huggingface_hub` provides `hf`):\n"
    f"  hf download {PUBLISHED_BASE} --local-dir ckpt/Wan2.2-S2V-14B\n"
    f"  hf download {PUBLISHED_LORA} --local-dir ckpt/LiveAvatar     "
    f"# then --model.lora ckpt/LiveAvatar/{LORA_FILE}\n"
    f"(`huggingface-cli download ...` with the same arguments on older huggingface_hub.) Downloaded into the hub "
    f"cache instead (no --local-dir), pass the ids: --model.checkpoint {PUBLISHED_BASE} --model.lora "
    f"{PUBLISHED_LORA}."
)


class WeightsNotFound(FileNotFoundError):
    """A weights path or hub id names nothing on this machine; the message says what to download."""


def hub_cache_dirs() -> list[Path]:
    """The caches a hub id is looked up in, in order (read now, so HF_HUB_CACHE set by a caller counts)."""
    from huggingface_hub import constants

    return [Path(constants.HF_HUB_CACHE), LIVEAVATAR_CACHE]


def cached_snapshot(repo_id: str, cache_dirs: Sequence[Path] | None = None) -> Path | None:
    """The folder of `repo_id`'s main revision in a local hub cache (models--org--name/snapshots/<rev>), or None."""
    if not _HUB_ID.match(repo_id):
        return None
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    for cache in hub_cache_dirs() if cache_dirs is None else cache_dirs:
        try:
            return Path(snapshot_download(repo_id, cache_dir=str(cache), local_files_only=True))
        except (LocalEntryNotFoundError, HFValidationError):
            continue
    return None


def _existing(value: str) -> Path | None:
    for candidate in (Path(value), REPO_ROOT / value):
        if candidate.exists():
            return candidate
    return None


def resolve_checkpoint(value: str, cache_dirs: Sequence[Path] | None = None) -> Path:
    """`--model.checkpoint`: a bundle file, a published folder, or a hub id in the local cache."""
    found = _existing(value) or cached_snapshot(value, cache_dirs)
    if found is None:
        raise WeightsNotFound(
            f"--model.checkpoint {value!r} does not exist: no such file or folder"
            f"{_not_cached(value)}. Give a .safetensors bundle, a checkpoint folder, a hub id in the local cache, "
            f"or null for random weights.\n{DOWNLOAD_HELP}")
    return found


def resolve_lora(value: str, cache_dirs: Sequence[Path] | None = None) -> Path:
    """`--model.lora`: a LoRA .safetensors file, a folder holding one (`liveavatar.safetensors` first), or a
    hub id in the local cache (`Quark-Vision/Live-Avatar`)."""
    found = _existing(value) or cached_snapshot(value, cache_dirs)
    if found is None:
        raise WeightsNotFound(f"--model.lora {value!r} does not exist: no such file or folder"
                              f"{_not_cached(value)}.\n{DOWNLOAD_HELP}")
    if found.is_file():
        return found
    if (found / LORA_FILE).is_file():
        return found / LORA_FILE
    files = sorted(found.glob("*.safetensors"))
    if len(files) != 1:
        raise WeightsNotFound(f"--model.lora {value!r}: the folder {found} holds {len(files)} .safetensors files "
                              f"and no {LORA_FILE}; name the file")
    return files[0]


def _not_cached(value: str) -> str:
    if not _HUB_ID.match(value):
        return ""
    caches = ", ".join(str(c) for c in hub_cache_dirs())
    return f", nor a hub repository {value!r} in the local Hugging Face cache ({caches}; never downloaded here)"


def check_weights(checkpoint: str | None, lora: str | None) -> None:
    """Resolve both before anything loads, so a missing download is one clear error at start-up."""
    if checkpoint is not None:
        resolve_checkpoint(checkpoint)
    if lora is not None:
        resolve_lora(lora)
