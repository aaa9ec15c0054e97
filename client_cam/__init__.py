"""The avatar as a camera and a microphone for video calls.

`python -m client_cam --server URL` speaks to a liveavatar server over the page's WebRTC path, sends the
local microphone (or a speech file), and writes the avatar's video to a virtual camera and its returned
voice to a virtual microphone (or both to an MP4). The sinks are shared with `run_server.py --virtualcam`.
"""
