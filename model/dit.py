"""The audio-conditioned DiT of the Wan2.2-S2V / LiveAvatar family, streamed block by block.

Streaming API (what `model/pipeline.py` codes against):

    dit = AvatarDiT(cfg.model.dit)                       # any size from DiTConfig
    cache = dit.new_cache(batch_size, device, dtype)     # StreamCache: fixed-size buffers, allocated once
    dit.prefill(cache, ref_latent, text_context, motion_latents=None)
        # ref_latent [B,16,1,h,w]: attention sink (K/V kept for the whole session);
        # text_context [B, L<=text_len, text_dim]: projected and its K/V cached once per layer;
        # motion_latents [B,16,T,h,w] (optional, e.g. the previous clip's latents): packed FramePack-style
        # (1 + 2 + 16 latent frames) into the sink. Calling prefill again replaces the sink and the text,
        # and keeps the rolling window (that is how the motion context of the previous clip is refreshed).
    v = dit(noisy, timestep, audio, cache, frame_start)
        # noisy [B,16,F,h,w], timestep [B] in 0..1000, audio [B, 4*F, num_audio_layers, audio_dim]
        # (wav2vec2 hidden states of every layer, one row per video frame of this block),
        # frame_start: index of the block's first latent frame in the stream (int, 0, F, 2F, ...).
        # Returns the flow velocity, same shape as `noisy`, float32. Does not modify the cache.
    dit.commit(cache, clean, audio, frame_start)
        # runs the clean block at timestep 0 and appends its K/V to the rolling window
        # (the window keeps kv_cache_blocks - 1 committed blocks; with the block being denoised that is
        # kv_cache_blocks blocks, one clip of the reference: 4 x 3 latent frames).

F = cfg.num_frames_per_block latent frames. A block attends to the sink, the committed window and
itself, never to later blocks. RoPE is applied at read time with positions relative to the block
being denoised, so positions stay bounded however long the stream runs (see `model/rope.py`).

Sequence parallelism hook: every self-attention call goes through `model.attention.attention`;
`model/parallel.py` wraps it (Ulysses all-to-all heads<->sequence) via
`model.attention.set_sequence_parallel(...)` without touching the layers (see that module).
"""
