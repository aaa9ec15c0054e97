"""`python -m client_cam --server URL`: the avatar as this computer's camera and microphone.

    python -m client_cam --server http://gpu-box:8080 [--token T] [--reference face.png] [--prompt TEXT]
                         [--sample_steps N] [--mic NAME | --audio FILE] [--camera DEVICE|off]
                         [--virtual-mic NAME|off] [--out FILE.mp4] [--seconds N]
    python -m client_cam --list-devices

Your microphone (or --audio FILE, played in real time) goes to the server; the avatar speaking it comes
back as the "LiveAvatar" camera (v4l2loopback on Linux, OBS Virtual Camera on Windows and macOS) and your
voice, in step with it, as a virtual microphone (Linux: a PulseAudio/PipeWire null sink made for the run;
Windows: VB-Cable's "CABLE Input"; macOS: BlackHole). --out records both to an MP4 instead (name --camera
or --virtual-mic as well to have them too). When the connection drops it reconnects, and the camera shows
the last frame, breathing, meanwhile. Ctrl-C stops and removes what it set up.
"""
from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import Sequence

import aiohttp

from client_cam.camera_sink import check_camera
from client_cam.connection import Connection, LiveState
from client_cam.errors import EXIT_USAGE, ClientError, ServerRefused
from client_cam.media_in import FileAudioTrack, MicrophoneTrack, list_devices
from client_cam.mic_sink import default_virtual_mic, open_virtual_mic
from client_cam.output import AvatarOutput
from client_cam.signaling import ServerLink, reference_data_url

log = logging.getLogger(__name__)

TOKEN_ENV_VAR = "LIVEAVATAR_TOKEN"
BACKOFF_S = (1.0, 2.0, 4.0, 8.0, 15.0)
STABLE_S = 10.0  # a connection that lasted this long resets the back-off


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m client_cam", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--server", help="the server's URL, e.g. http://gpu-box:8080")
    parser.add_argument("--token", default=os.environ.get(TOKEN_ENV_VAR),
                        help=f"the server's --token (default: ${TOKEN_ENV_VAR})")
    parser.add_argument("--reference", help="picture of the face to animate (PNG/JPEG/WebP)")
    parser.add_argument("--prompt", help="text prompt for the avatar (default: the server's)")
    parser.add_argument("--sample_steps", type=int, help="denoising steps per block, 1..8 (default: the server's)")
    parser.add_argument("--mic", help="microphone: a name or number from --list-devices, or FORMAT:DEVICE for "
                                      "av's inputs (alsa:default); default: the system's")
    parser.add_argument("--list-devices", action="store_true", help="list the audio devices and stop")
    parser.add_argument("--audio", help="send this speech file (played in real time) instead of the microphone")
    parser.add_argument("--out", help="record the avatar's video and voice to this MP4 (then no camera or "
                                      "virtual microphone unless named)")
    parser.add_argument("--seconds", type=float, help="stop by itself this long after connecting")
    parser.add_argument("--camera", help="virtual camera device (Linux: /dev/videoN; default: the first "
                                         "v4l2loopback device), or 'off'")
    parser.add_argument("--virtual-mic", dest="virtual_mic",
                        help=f"virtual microphone (Linux: the null sink to make or use; Windows/macOS: the output "
                             f"device to play to; default: {default_virtual_mic()}), or 'off'")
    return parser


def check_args(args: argparse.Namespace) -> None:
    if not args.server:
        raise ClientError("--server URL is required (e.g. --server http://gpu-box:8080)", EXIT_USAGE)
    if args.sample_steps is not None and not 1 <= args.sample_steps <= 8:
        raise ClientError(f"--sample_steps must be in 1..8, got {args.sample_steps}", EXIT_USAGE)
    if args.seconds is not None and args.seconds <= 0:
        raise ClientError(f"--seconds must be > 0, got {args.seconds:g}", EXIT_USAGE)
    if args.audio and args.mic:
        raise ClientError("--audio and --mic: pick one", EXIT_USAGE)
    if args.audio and not os.path.isfile(args.audio):
        raise ClientError(f"--audio {args.audio}: no such file", EXIT_USAGE)


def sinks_wanted(args: argparse.Namespace) -> tuple[bool, str | None, str | None]:
    """(camera on, its device, virtual microphone or None): --out alone records only."""
    camera = args.camera if args.camera is not None else ("off" if args.out else "")
    mic = args.virtual_mic if args.virtual_mic is not None else ("off" if args.out else default_virtual_mic())
    return camera != "off", camera or None, None if mic == "off" else mic


class StatusLine:
    """One line, rewritten in place on a terminal; every few seconds as a plain line otherwise (logs)."""

    def __init__(self, stream=sys.stderr, plain_every_s: float = 5.0) -> None:
        self._stream = stream
        self._tty = stream.isatty()
        self._plain_every_s = plain_every_s
        self._last_plain_s = 0.0
        self._width = 0

    def show(self, text: str) -> None:
        if self._tty:
            self._stream.write("\r" + text.ljust(self._width))
            self._width = len(text)
        elif time.monotonic() - self._last_plain_s >= self._plain_every_s:
            self._stream.write(text + "\n")
            self._last_plain_s = time.monotonic()
        self._stream.flush()

    def notice(self, text: str) -> None:
        """A line of its own (above the status line on a terminal)."""
        self._stream.write(("\r" + " " * self._width + "\r" if self._tty else "") + text + "\n")
        self._width = 0
        self._stream.flush()


def status_text(state: LiveState, output: AvatarOutput) -> str:
    fps_in, fps_out = output.counters.rates(time.monotonic())
    parts = [state.phase]
    if state.sessions > 1:
        parts.append(f"reconnects {state.sessions - 1}")
    parts.append(f"fps in {fps_in:4.1f} out {fps_out:4.1f}")
    latency = state.server_stats.get("latency_ms")
    parts.append("audio->video latency " + ("-" if latency is None else f"{latency:.0f} ms"))
    if output.format is not None:
        fmt = output.format
        parts.append(f"{fmt.width}x{fmt.height}@{fmt.fps:g}")
    return " | ".join(parts)


async def keep_connected(link: ServerLink, mic_track, output: AvatarOutput, state: LiveState,
                         settings: dict, status: StatusLine) -> None:
    """Connect, and reconnect with back-off whenever the session drops; raises what cannot be retried."""
    failures = 0
    async with aiohttp.ClientSession() as http:
        while True:
            connection = Connection(link, http, mic_track, output, state, settings, status.notice)
            started_s = time.monotonic()
            try:
                reason = await connection.run()
            except ServerRefused as exc:
                if not exc.retry or state.sessions == 0:
                    raise
                reason = str(exc)
            except Exception as exc:  # whatever one attempt raises, a live camera tries again
                if state.sessions == 0:
                    raise ClientError(f"could not connect to {link.url}: {type(exc).__name__}: {exc}") from exc
                log.warning("connection attempt failed", exc_info=True)
                reason = f"{type(exc).__name__}: {exc}"
            if time.monotonic() - started_s > STABLE_S:
                failures = 0
            wait_s = BACKOFF_S[min(failures, len(BACKOFF_S) - 1)]
            failures += 1
            state.phase = f"reconnecting in {wait_s:g} s"
            status.notice(f"connection lost ({reason}); reconnecting in {wait_s:g} s")
            await asyncio.sleep(wait_s)
            state.phase = "reconnecting"


async def run(args: argparse.Namespace) -> int:
    """Set up the sinks, keep the session going until Ctrl-C/--seconds, then leave every device as it was."""
    check_args(args)
    use_camera, camera_device, mic_name = sinks_wanted(args)
    settings = {"reference": reference_data_url(args.reference) if args.reference else None,
                "prompt": args.prompt, "sample_steps": args.sample_steps}
    if use_camera:
        check_camera(camera_device)
    status = StatusLine()
    stop = asyncio.Event()
    fatal: list[BaseException] = []

    def on_fatal(exc: BaseException) -> None:
        fatal.append(exc)
        stop.set()

    mic_sink = open_virtual_mic(mic_name) if mic_name else None
    output = AvatarOutput(camera_device, use_camera, args.out, mic=None, on_fatal=on_fatal)
    mic_track = None
    tasks: list[asyncio.Task] = []
    handled = _handle_signals(stop)
    try:
        if mic_sink is not None:
            await mic_sink.start()
            output.mic = mic_sink
            status.notice(f"virtual microphone: {mic_name}" + (f" (pick '{mic_name}' or 'Monitor of {mic_name}-voice' "
                                                                "in the call app)" if sys.platform.startswith("linux")
                                                                else ""))
        mic_track = FileAudioTrack(args.audio) if args.audio else MicrophoneTrack(args.mic)
        state = LiveState()
        link = ServerLink(args.server, args.token)
        connecting = asyncio.create_task(keep_connected(link, mic_track, output, state, settings, status))
        connecting.add_done_callback(lambda task: on_fatal(task.exception()) if not task.cancelled()
                                     and task.exception() else None)
        tasks = [connecting, asyncio.create_task(_show_status(state, output, status)),
                 asyncio.create_task(_stop_after(args.seconds, state, stop))]
        await stop.wait()
        if fatal:
            raise fatal[0]
        return 0
    finally:
        for sig in handled:
            asyncio.get_running_loop().remove_signal_handler(sig)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if mic_track is not None:
            mic_track.stop()
        if output.mic is None and mic_sink is not None:
            await mic_sink.close()  # started part-way
        await output.close()
        if output.counters.frames_out:
            counters = output.counters
            status.notice(f"stopped: {counters.frames_out} frames out, {counters.filler_frames} of them while no "
                          "frame came" + (f"; recorded to {args.out}" if args.out else ""))


def _handle_signals(stop: asyncio.Event) -> list[int]:
    """Ctrl-C and SIGTERM stop the client cleanly. Windows' event loop has no signal handlers: there Ctrl-C
    cancels the run (asyncio.run turns it into a cancellation), and the same clean-up runs."""
    handled = []
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            handled.append(sig)
        except (NotImplementedError, RuntimeError):
            pass
    return handled


async def _show_status(state: LiveState, output: AvatarOutput, status: StatusLine) -> None:
    while True:
        await asyncio.sleep(1.0)
        status.show(status_text(state, output))


async def _stop_after(seconds: float | None, state: LiveState, stop: asyncio.Event) -> None:
    if seconds is None:
        return
    while state.connected_s is None:
        await asyncio.sleep(0.05)
    await asyncio.sleep(seconds)
    stop.set()


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        if args.list_devices:
            print(list_devices())
            return 0
        return asyncio.run(run(args))
    except ClientError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:  # Ctrl-C before the handlers were in place, or on Windows
        return 0
