"""With `video.sizing aspect` each session's frames follow its reference image: the session's format, its
video track and the clips the engine makes for it all have the size the model picked for that image."""
from __future__ import annotations

import numpy as np

from model.config import load_config
from model.io_types import AudioWindow
from server.engine import ModelEngine
from server.session import Session


async def test_a_portrait_and_a_landscape_session_each_stream_their_own_frame_size():
    cfg = load_config(None, {"model.checkpoint": None, "stream.scheme": "reference", "video.size": "192*128",
                             "server.max_sessions": 2})
    engine = ModelEngine(cfg)
    await engine.load()
    rng = np.random.default_rng(0)
    try:
        assert engine.stream_format.frame_size == (128, 192)
        for image_hw, frame_hw in (((300, 160), (192, 128)), ((160, 300), (128, 192))):
            image = rng.integers(0, 255, (*image_hw, 3), dtype=np.uint8)
            session = Session(cfg, engine, image)
            try:
                assert session.format.frame_size == session.video_track.frame_size == frame_hw
                await session.start(image, "hello")
                fmt = session.format
                window = AudioWindow(np.zeros(fmt.context_samples + fmt.clip_samples, np.float32),
                                     fmt.context_samples, 0.0, 0)
                clip = await engine.submit(session.session_id, window)
                assert clip.frames.shape == (fmt.frames_per_clip, *frame_hw, 3)
                session.video_track.add_clip(clip)  # the track takes the session's size
            finally:
                await session.close()
    finally:
        await engine.close()
