"""Hub ids for --model.checkpoint / --model.lora, resolved through a local Hugging Face cache laid out by the test
in huggingface_hub's real layout (models--org--name/{refs/main, blobs/<hash>, snapshots/<rev>/<file> -> blob}),
never downloading; a name found nowhere is one error naming the published repositories and the download commands."""

from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from model.config import load_config
from model.net.dit import AvatarDiT
from model.weights.checkpoint import load_dit, original_state_dict, write_sharded
from model.weights.hub import (
    LORA_FILE,
    PUBLISHED_BASE,
    PUBLISHED_LORA,
    WeightsNotFound,
    cached_snapshot,
    resolve_checkpoint,
    resolve_lora,
)

REVISION = "0123456789abcdef0123456789abcdef01234567"


def lay_out_in_cache(cache: Path, repo_id: str, files: Path) -> Path:
    """Put the files under `files` into `cache` as huggingface_hub stores a download; returns the snapshot."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / REVISION
    (repo / "blobs").mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(REVISION)  # no newline, as the hub writes it
    for source in sorted(p for p in files.rglob("*") if p.is_file()):
        blob = repo / "blobs" / hashlib.sha256(source.read_bytes()).hexdigest()
        shutil.copyfile(source, blob)
        link = snapshot / source.relative_to(files)
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(blob, link.parent))
    return snapshot


@pytest.fixture(scope="module")
def cfg():
    return load_config("configs/tiny.yaml").model.dit


@pytest.fixture(scope="module")
def hub(cfg, tmp_path_factory):
    """A cache holding a tiny Wan2.2-S2V-14B (DiT shards) and a LiveAvatar LoRA under their published ids."""
    root = tmp_path_factory.mktemp("hub")
    torch.manual_seed(2)
    source = AvatarDiT(cfg).eval()
    write_sharded(original_state_dict(source), root / "base", 2_000_000)
    down = torch.randn(2, cfg.dim, generator=torch.Generator().manual_seed(1))
    up = torch.randn(cfg.dim, 2, generator=torch.Generator().manual_seed(2))
    (root / "lora").mkdir()
    save_file({"base_model.model.blocks.0.self_attn.q.lora_A.default.weight": down,
               "base_model.model.blocks.0.self_attn.q.lora_B.default.weight": up},
              str(root / "lora" / LORA_FILE), metadata={"lora_alpha": "2"})
    cache = root / "cache"
    base = lay_out_in_cache(cache, PUBLISHED_BASE, root / "base")
    lora = lay_out_in_cache(cache, PUBLISHED_LORA, root / "lora")
    return cache, base, lora, source, (down, up)


def test_published_ids_resolve_to_their_cached_snapshots_and_load(hub, cfg, monkeypatch) -> None:
    cache, base, lora, source, (down, up) = hub
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint(PUBLISHED_BASE) == base
    assert resolve_lora(PUBLISHED_LORA) == lora / LORA_FILE
    loaded = load_dit(cfg, resolve_checkpoint(PUBLISHED_BASE), lora=PUBLISHED_LORA)  # the LoRA by its id
    want = source.blocks[0].attn1.to_q.weight.double() + 1.0 * (up.double() @ down.double())
    torch.testing.assert_close(loaded.blocks[0].attn1.to_q.weight.double(), want, atol=1e-5, rtol=1e-6)
    assert torch.equal(loaded.blocks[1].attn1.to_q.weight, source.blocks[1].attn1.to_q.weight)


def test_a_path_wins_over_an_id_and_a_lora_folder_gives_its_file(hub, tmp_path, monkeypatch) -> None:
    cache, _, lora, _, _ = hub
    assert resolve_lora(str(lora)) == lora / LORA_FILE  # a --local-dir download: the folder is enough
    (tmp_path / "Wan-AI" / "Wan2.2-S2V-14B").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(cache))
    assert resolve_checkpoint(PUBLISHED_BASE) == Path(PUBLISHED_BASE)  # the relative folder, not the cache
    assert cached_snapshot("not-cached/anything", [cache]) is None
    assert cached_snapshot("ckpt/../escape", [cache]) is None


def test_names_found_nowhere_say_what_to_download(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    with pytest.raises(WeightsNotFound) as caught:
        resolve_checkpoint(PUBLISHED_BASE)
    message = str(caught.value)
    assert f"--model.checkpoint '{PUBLISHED_BASE}' does not exist" in message
    assert f"hf download {PUBLISHED_BASE} --local-dir ckpt/Wan2.2-S2V-14B" in message
    assert f"hf download {PUBLISHED_LORA} --local-dir ckpt/LiveAvatar" in message
    assert str(tmp_path / "empty-cache") in message and "never downloaded" in message
    with pytest.raises(WeightsNotFound, match=r"--model.lora 'Quark-Vision/Live-Avatar' does not exist"):
        resolve_lora(PUBLISHED_LORA)
    (tmp_path / "two").mkdir()
    for name in ("a.safetensors", "b.safetensors"):
        save_file({"x": torch.zeros(1)}, str(tmp_path / "two" / name))
    with pytest.raises(WeightsNotFound, match="holds 2 .safetensors files and no liveavatar.safetensors"):
        resolve_lora(str(tmp_path / "two"))
