"""Timestep-forcing pipeline parallelism (LiveAvatar's TPP, `parallel.mode tpp`): each GPU owns one step.

With N DiT ranks and N sampling steps, rank s holds the whole DiT and KV window s (the semantics of
`sampler.kv_update per_step`) and only ever runs step s. The pipeline moves in ticks: at tick k rank s
runs step s of block k-s, then every rank hands its latents to the next one in one grouped exchange
(`ParallelGroup.ring_exchange`), and the last rank's clean block goes back to rank 0, which decodes and
serves. So N blocks are in flight and each GPU does one DiT call per block instead of N.

Rank 0 drives (`TppDriver`): before each tick it announces what enters the pipeline (`Tick`, over the
CPU control group) and broadcasts that block's audio features; every rank then shifts the same picture
of which block sits at which step. A clip's first block (after the first clip) also carries the motion
context: every rank prefills the new sink at that tick into a spare buffer (`TppStage`) and swaps it in
when the block reaches its step, so each window's sink changes exactly between the previous block and
this one, as on one process. The motion context leaves out the newest N-1 blocks, which are still in
flight (`KVUpdate.motion_lag_blocks`); `StreamingAvatar` in per_step mode defines the clip boundary the
same way, so N ranks give the frames of one process. The streaming scheme's parts travel the same way:
each block's sink distances (one per step, drawn on rank 0) ride in its `Ticket`, a swapped sink latent
(`stream.sink_swap`) and the motion latents ride with the clip's first block, and every window is opened
with the session's initial motion latents and `stream.motion_rope`.

Only `model/parallel/group.py`'s group API is used here (broadcast_job, broadcast_tensor, ring_exchange).
"""
from __future__ import annotations

import collections
import itertools
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from model.io_types import AudioWindow
from model.net.dit import AvatarDiT, StreamCache
from model.stream.avatar import MotionHistory, StreamingAvatar, copy_sink, sink_kwargs
from model.stream.sampler import FlowMatchSchedule, euler_step

OP_STEP, OP_OPEN, OP_CLOSE, OP_QUIT = "step", "open", "close", "quit"  # "quit" = group_sessions.JOB_QUIT

_DTYPE_NAMES = {torch.float32: "float32", torch.bfloat16: "bfloat16", torch.float16: "float16"}


@dataclass(frozen=True)
class Ticket:
    """One block on its way through the pipeline."""

    session_id: int
    index: int  # the block's index in its session's stream
    frame_start: int  # its first latent frame
    new_sink: bool = False  # a clip's first block (not the stream's): the sink is re-prefilled with motion
    sink_distances: tuple[int | None, ...] = ()  # the reference sink's distance at each step (None: +30 rule)


@dataclass(frozen=True)
class Tick:
    """What rank 0 announces before each tick; `tensors` (name, shape, dtype) are broadcast right after."""

    op: str
    session_id: int = -1
    enter: Ticket | None = None
    tensors: tuple[tuple[str, tuple[int, ...], str], ...] = ()
    motion_rope: str = "follow"  # OP_OPEN: the windows' motion RoPE rule (stream.motion_rope)


@dataclass
class _StageSession:
    """One rank's part of a session: its KV window and the blocks' inputs it still has to use."""

    ring: StreamCache
    ref_latent: torch.Tensor  # the latent in the sink (the reference image's, or the swapped-in first frame)
    text_context: torch.Tensor
    audio: dict[int, torch.Tensor] = field(default_factory=dict)  # block index -> audio features
    sinks: dict[int, StreamCache] = field(default_factory=dict)  # block index -> its clip's new sink


class TppStage:
    """The step this rank owns: its windows, the shift register of blocks, and the hand-over to the next rank."""

    def __init__(self, dit: AvatarDiT, cfg: Any, group: Any) -> None:
        self.dit, self.cfg, self.group = dit, cfg, group
        self.step, self.size = group.pp_rank, group.pp_size
        self.schedule = FlowMatchSchedule(self.size, cfg.sampler.shift, cfg.sampler.num_train_timesteps)
        self.frames_per_block = cfg.model.dit.num_frames_per_block
        self.in_flight: list[Ticket | None] = [None] * self.size  # in_flight[s]: the block at step s
        self.sessions: dict[int, _StageSession] = {}
        self.incoming: torch.Tensor | None = None  # latents from the previous rank for this rank's next block
        self.device = group.device
        self.blocks_done = 0

    def apply(self, tick: Tick, given: dict[str, torch.Tensor] | None = None,
              noise: torch.Tensor | None = None) -> tuple[Ticket, torch.Tensor] | None:
        """Run one announced tick; rank 0 passes the tensors it announced (and the entering block's noise).

        Returns, on rank 0, the block that came out clean this tick (or None).
        """
        tensors = self._receive(tick, given or {})
        if tick.op == OP_OPEN:
            self._open(tick.session_id, tensors["ref_latent"], tensors["text_context"], tensors["motion"],
                       tick.motion_rope)
            return None
        if tick.op == OP_CLOSE:
            session = self.sessions.pop(tick.session_id, None)
            if session is not None:
                session.ring.clear()
            return None
        if tick.op != OP_STEP:
            raise ValueError(f"unknown tick {tick.op!r}")
        return self._step(tick, tensors, noise)

    # ---- pieces

    def _receive(self, tick: Tick, given: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        out = {}
        for name, shape, dtype in tick.tensors:
            out[name] = self.group.broadcast_tensor(given.get(name), shape, getattr(torch, dtype))
        return out

    def _open(self, session_id: int, ref_latent: torch.Tensor, text_context: torch.Tensor, motion: torch.Tensor,
              motion_rope: str) -> None:
        ring = self.dit.new_cache(1, self.device, ref_latent.dtype, motion_rope=motion_rope)
        self.dit.prefill(ring, ref_latent, text_context, motion)  # the session's initial motion latents
        self.sessions[session_id] = _StageSession(ring, ref_latent, text_context)

    def _step(self, tick: Tick, tensors: dict[str, torch.Tensor],
              noise: torch.Tensor | None) -> tuple[Ticket, torch.Tensor] | None:
        enter = tick.enter
        if enter is not None:
            session = self.sessions[enter.session_id]
            session.audio[enter.index] = tensors["audio"]
            if enter.new_sink:
                if "sink_latent" in tensors:  # stream.sink_swap: this clip on, the stream's first frame
                    session.ref_latent = tensors["sink_latent"]
                sink = StreamCache(1, self.device, session.ring.dtype, 0, motion_rope=session.ring.motion_rope,
                                   slot_frame_start=[])
                self.dit.prefill(sink, session.ref_latent, session.text_context, tensors["motion"])
                session.sinks[enter.index] = sink
        self.in_flight = [enter] + self.in_flight[:-1]
        mine = self.in_flight[self.step]
        out = None
        if mine is not None:
            x = noise if self.step == 0 else self.incoming
            out = self._run(mine, x)
        before = self.in_flight[(self.step - 1) % self.size]  # the block the previous rank just ran
        shape = None
        if before is not None:
            ref = self.sessions[before.session_id].ref_latent
            shape = ((1, ref.shape[1], self.frames_per_block, *ref.shape[3:]), ref.dtype)
        received = self.group.ring_exchange(out, shape)
        if self.step == 0:
            self.incoming = None
            return None if before is None else (before, received)
        self.incoming = received
        return None

    def _run(self, ticket: Ticket, x: torch.Tensor) -> torch.Tensor:
        """This rank's sampling step of one block, reading and writing this rank's KV window."""
        session = self.sessions[ticket.session_id]
        if ticket.new_sink:
            copy_sink(session.sinks.pop(ticket.index), session.ring)
        audio = session.audio.pop(ticket.index)
        t = torch.full((x.shape[0],), float(self.schedule.timesteps[self.step]), device=x.device)
        distance = ticket.sink_distances[self.step] if ticket.sink_distances else None
        velocity = self.dit(x, t, audio, session.ring, ticket.frame_start, store_slot=True, **sink_kwargs(distance))
        self.blocks_done += 1
        return euler_step(x, velocity, self.schedule, self.step)


class TppDriver:
    """Rank 0's side: queues blocks, announces ticks, collects clean blocks and keeps each session's motion."""

    def __init__(self, dit: AvatarDiT, cfg: Any, group: Any) -> None:
        self.group = group
        self.stage = TppStage(dit, cfg, group)
        self.waiting: collections.deque[tuple[Ticket, torch.Tensor, torch.Tensor, torch.Tensor | None]] = \
            collections.deque()
        self.done: dict[tuple[int, int], torch.Tensor] = {}
        self.histories: dict[int, MotionHistory] = {}
        self.refills: dict[int, bool] = {}  # session -> motion refilled from generated frames (stream.motion)

    @property
    def steps(self) -> int:
        return self.stage.size

    def open(self, session_id: int, ref_latent: torch.Tensor, text_context: torch.Tensor,
             history: MotionHistory, motion_rope: str = "follow", refill_motion: bool = True) -> None:
        """Every rank prefills its window with the session's sink (`history.latents` as its motion);
        `history` (lag steps-1) is kept here and, with `refill_motion`, fed with every clean block."""
        if history.lag_blocks != self.steps - 1:
            raise ValueError(f"motion history lags {history.lag_blocks} blocks; tpp needs {self.steps - 1}")
        self.histories[session_id] = history
        self.refills[session_id] = refill_motion
        given = {"ref_latent": ref_latent, "text_context": text_context, "motion": history.latents}
        self._announce(Tick(OP_OPEN, session_id, tensors=tuple(_describe(k, v) for k, v in given.items()),
                            motion_rope=motion_rope), given)

    def submit(self, ticket: Ticket, noise: torch.Tensor, audio: torch.Tensor,
               sink_latent: torch.Tensor | None = None) -> Ticket:
        """Queue a block (with a `new_sink`, optionally the latent the sink swaps to); it enters the pipeline
        at the next free tick."""
        self.waiting.append((ticket, noise, audio, sink_latent))
        return ticket

    def wait(self, ticket: Ticket) -> torch.Tensor:
        """Tick until `ticket`'s block is clean (queued blocks keep entering meanwhile); its latents."""
        key = (ticket.session_id, ticket.index)
        while key not in self.done:
            if not self.waiting and not any(self.stage.in_flight):
                raise RuntimeError(f"block {ticket.index} of session {ticket.session_id} was never submitted")
            self.tick()
        return self.done.pop(key)

    def tick(self) -> None:
        """One tick: the next queued block (if any) enters at step 0, every block in flight moves on one step."""
        given: dict[str, torch.Tensor] = {}
        enter, noise = None, None
        if self.waiting:
            enter, noise, audio, sink_latent = self.waiting.popleft()
            given["audio"] = audio
            if enter.new_sink:
                history = self.histories[enter.session_id]
                given["motion"] = history.before(enter.index) if self.refills[enter.session_id] else history.latents
                if sink_latent is not None:
                    given["sink_latent"] = sink_latent
        tick = Tick(OP_STEP, enter=enter, tensors=tuple(_describe(k, v) for k, v in given.items()))
        finished = self._announce(tick, given, noise)
        if finished is not None:
            ticket, latents = finished
            self.done[(ticket.session_id, ticket.index)] = latents
            if self.refills[ticket.session_id]:
                self.histories[ticket.session_id].add(ticket.index, latents)

    def close(self, session_id: int) -> None:
        """Finish the session's blocks in flight, then free its windows on every rank."""
        while any(t is not None and t.session_id == session_id for t in self.stage.in_flight) or any(
                t.session_id == session_id for t, *_ in self.waiting):
            self.tick()
        self.done = {k: v for k, v in self.done.items() if k[0] != session_id}
        self.histories.pop(session_id, None)
        self.refills.pop(session_id, None)
        self._announce(Tick(OP_CLOSE, session_id), {})

    def quit(self) -> None:
        """Release the follower ranks (they return from `follow`)."""
        self.group.broadcast_job(Tick(OP_QUIT))

    def _announce(self, tick: Tick, given: dict[str, torch.Tensor],
                  noise: torch.Tensor | None = None) -> tuple[Ticket, torch.Tensor] | None:
        self.group.broadcast_job(tick)
        return self.stage.apply(tick, given, noise)


def _describe(name: str, tensor: torch.Tensor) -> tuple[str, tuple[int, ...], str]:
    return name, tuple(tensor.shape), _DTYPE_NAMES[tensor.dtype]


def follow(models: Any, cfg: Any, group: Any) -> int:
    """Ranks 1..N-1: run rank 0's ticks until it says quit; returns how many blocks this rank stepped."""
    stage = TppStage(models.dit, cfg, group)
    with torch.inference_mode():
        while True:
            tick = group.broadcast_job(None)
            if getattr(tick, "op", getattr(tick, "kind", None)) == OP_QUIT:
                return stage.blocks_done
            stage.apply(tick)


# ----------------------------------------------------------------------------- rank 0's avatar

_drivers: dict[int, TppDriver] = {}
_session_ids = itertools.count()


def driver_for(models: Any, cfg: Any, group: Any) -> TppDriver:
    """One driver per process and group: every session of rank 0 shares the pipeline."""
    key = id(group)
    if key not in _drivers:
        _drivers[key] = TppDriver(models.dit, cfg, group)
    return _drivers[key]


class TppAvatar(StreamingAvatar):
    """`StreamingAvatar` on rank 0 of a tpp group: same calls and frames, the sampling runs on N GPUs.

    Encoding (reference, prompt, audio), the noise and the decode stay here; each block's steps run
    on the pipeline. A clip drains the pipeline before it returns (no next window is known yet); a
    caller with windows in hand can keep it full through `TppDriver` directly (bench/gpu_bench.py).
    """

    def __init__(self, models: Any, cfg: Any, seed: int | None, group: Any) -> None:
        super().__init__(models, cfg, seed=seed)
        if group.rank != 0:
            raise RuntimeError(f"rank {group.rank} tried to open a session; only rank 0 serves")
        self._driver = driver_for(models, cfg, group)
        self.session_id = next(_session_ids)
        self._open = False

    @torch.inference_mode()
    def start(self, reference_image: Any, prompt: str) -> None:
        super().start(reference_image, prompt)
        session = self._session
        self._driver.open(self.session_id, session.ref_latent, session.text_context, session.motion,
                          motion_rope=self.stream.motion_rope, refill_motion=self.stream.motion == "generated")
        self._open = True

    def _open_rings(self, ref_latent, text_context, motion_latents, count) -> list[StreamCache]:
        return []  # the windows live on the ranks (rank 0's in its TppStage)

    def _denoise_blocks(self, window: AudioWindow, sample_steps: int | None) -> Iterator[torch.Tensor]:
        session = self._require_session()
        steps = self._check_steps(sample_steps)
        self._check_window(window)
        tickets = []
        for i, block_audio in enumerate(self._block_audio(window)):
            index = session.next_frame // self.frames_per_block
            refill, swap = self._sink_change(session) if i == 0 and index > 0 else (False, False)
            ticket = Ticket(self.session_id, index, session.next_frame, new_sink=refill or swap,
                            sink_distances=session.sink_distances.draw(steps))
            sink_latent = session.sink_latent if swap else None
            tickets.append(self._driver.submit(ticket, self._noise(session), block_audio, sink_latent))
            session.next_frame += self.frames_per_block
        for ticket in tickets:
            self.denoiser_calls += steps
            latents = self._driver.wait(ticket)
            self._note_first_frame(session, ticket.frame_start, latents)
            yield latents

    def close(self) -> None:
        if self._open:
            self._driver.close(self.session_id)
            self._open = False
        super().close()
