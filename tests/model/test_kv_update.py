"""KV update modes: the DiT's `store_slot` write, and the sampler's clean_pass / last_step / per_step blocks."""
from __future__ import annotations

import torch

from model.config import load_config
from model.dit import AvatarDiT


def _dit_and_inputs():
    cfg = load_config(None, {"model.checkpoint": None})
    torch.manual_seed(0)
    dit = AvatarDiT(cfg.model.dit).eval()
    d = cfg.model.dit
    g = torch.Generator().manual_seed(1)
    ref = torch.randn(1, d.in_channels, 1, 8, 8, generator=g)
    text = torch.randn(1, 5, d.text_dim, generator=g)
    audio = torch.randn(1, 4 * d.num_frames_per_block, d.num_audio_layers, d.audio_dim, generator=g)
    block = torch.randn(1, d.in_channels, d.num_frames_per_block, 8, 8, generator=g)
    return dit, ref, text, audio, block


def test_store_slot_writes_what_commit_writes_and_returns_the_same_velocity() -> None:
    dit, ref, text, audio, block = _dit_and_inputs()
    zero = torch.zeros(1)
    with torch.inference_mode():
        committed, stored = dit.new_cache(1, "cpu", torch.float32), dit.new_cache(1, "cpu", torch.float32)
        for cache in (committed, stored):
            dit.prefill(cache, ref, text)
        plain = dit(block, zero, audio, committed, 0)
        dit.commit(committed, block, audio, 0)
        with_store = dit(block, zero, audio, stored, 0, store_slot=True)
    torch.testing.assert_close(with_store, plain)
    torch.testing.assert_close(stored.kv_k, committed.kv_k)
    torch.testing.assert_close(stored.kv_v, committed.kv_v)
    assert stored.slot_frame_start == committed.slot_frame_start and stored.next_slot == committed.next_slot == 1
