"""Few-step flow-matching sampler: diffusers' FlowMatchEulerDiscreteScheduler schedule, plain Euler steps.

LiveAvatar samples its distilled model with `FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000,
shift=3)` and `set_timesteps(sample_steps)` (liveavatar/models/wan/causal_s2v_pipeline_tpp.py), one Euler
step per timestep, no re-noising: x <- x + (sigma_next - sigma) * v. The schedule is a pure function of
(sample_steps, shift), so it can change between clips (the server's live `sample_steps` control).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import cached_property

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (latents, timestep [B]) -> velocity
MAX_SAMPLE_STEPS = 8


def _shift_sigma(sigma: torch.Tensor, shift: float) -> torch.Tensor:
    """Flow-matching time shift (SD3/Wan): more steps at high noise for shift > 1."""
    return shift * sigma / (1 + (shift - 1) * sigma)


@dataclass(frozen=True)
class FlowMatchSchedule:
    """Timesteps (0..1000) and sigmas (1..0) for `sample_steps` Euler steps at a given `shift`."""

    sample_steps: int
    shift: float = 3.0
    num_train_timesteps: int = 1000

    def __post_init__(self) -> None:
        if not 1 <= self.sample_steps <= MAX_SAMPLE_STEPS:
            raise ValueError(f"sample_steps must be in 1..{MAX_SAMPLE_STEPS}, got {self.sample_steps}")
        if self.shift <= 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    @cached_property
    def sigmas(self) -> torch.Tensor:
        """sample_steps + 1 noise levels, float32, from 1 down to a terminal 0 (as diffusers appends it)."""
        n_train = self.num_train_timesteps
        # diffusers: training sigmas t/n_train for t in n_train..1, shifted; inference spans their extremes
        sigma_min = _shift_sigma(torch.tensor(1.0 / n_train, dtype=torch.float64), self.shift)
        t = torch.linspace(n_train, float(sigma_min) * n_train, self.sample_steps, dtype=torch.float64)
        sigmas = _shift_sigma(t / n_train, self.shift).float()
        return torch.cat([sigmas, sigmas.new_zeros(1)])

    @cached_property
    def timesteps(self) -> torch.Tensor:
        """The DiT's timestep input per step, float32 in (0, 1000]."""
        return self.sigmas[:-1] * self.num_train_timesteps

    def noise_to(self, clean: torch.Tensor, noise: torch.Tensor, step: int) -> torch.Tensor:
        """The flow-matching interpolation at step `step`: (1 - sigma) * clean + sigma * noise."""
        sigma = self.sigmas[step]
        return ((1 - sigma) * clean.float() + sigma * noise.float()).to(noise.dtype)


@dataclass(frozen=True)
class DenoisedBlock:
    """A block's clean latents and how many denoiser calls they took."""

    latents: torch.Tensor
    denoiser_calls: int


def denoise_block(denoiser: Denoiser, noise: torch.Tensor, schedule: FlowMatchSchedule) -> DenoisedBlock:
    """Run the Euler loop from pure noise [B, ...] to clean latents; one denoiser call per step."""
    return denoise_steps(lambda x, t, step: denoiser(x, t), noise, schedule)


def euler_step(x: torch.Tensor, velocity: torch.Tensor, schedule: FlowMatchSchedule, step: int) -> torch.Tensor:
    """One Euler step from sigma[step] to sigma[step + 1], in float32, back in x's dtype."""
    d_sigma = float(schedule.sigmas[step + 1] - schedule.sigmas[step])
    return (x.float() + d_sigma * velocity.float()).to(x.dtype)


# ----------------------------------------------------------------------------- how a block's K/V enter the window

KV_CLEAN_PASS, KV_LAST_STEP, KV_PER_STEP = "clean_pass", "last_step", "per_step"


@dataclass(frozen=True)
class KVUpdate:
    """Where each sampling step reads and writes K/V, for one `sampler.kv_update` mode and step count.

    per_step: one window per step; step s reads window s and writes the block's step-s K/V into it
      (steps calls per block). Each step only ever sees its own noise level's history, which is what
      lets one GPU own one step (timestep-forcing pipeline parallelism, `model/parallel/tpp.py`). This is
      LiveAvatar's scheme: no clean pass, every denoising call writes its own step's cache
      (causal_s2v_pipeline_tpp.py L1062-1078, causal_s2v_pipeline.py L1086 `kv_cache1[str(i+1)]`).
    clean_pass: one window; no step writes it, an extra pass on the clean block at timestep 0 does
      (steps + 1 DiT calls per block; not in the reference).
    last_step: one window; the last step's call writes the block's K/V (steps calls per block).
    """

    mode: str
    steps: int

    def __post_init__(self) -> None:
        if self.mode not in (KV_CLEAN_PASS, KV_LAST_STEP, KV_PER_STEP):
            raise ValueError(f"--sampler.kv_update must be one of {(KV_CLEAN_PASS, KV_LAST_STEP, KV_PER_STEP)}, "
                             f"got {self.mode!r}")

    @property
    def rings(self) -> int:
        """How many KV windows a session keeps."""
        return self.steps if self.mode == KV_PER_STEP else 1

    @property
    def clean_pass(self) -> bool:
        return self.mode == KV_CLEAN_PASS

    @property
    def calls(self) -> int:
        """DiT calls per block: one per step, plus the clean pass."""
        return self.steps + int(self.clean_pass)

    def ring(self, step: int) -> int:
        """The window step `step` reads (and, if `stores`, writes)."""
        return step if self.mode == KV_PER_STEP else 0

    def stores(self, step: int) -> bool:
        """Whether step `step`'s DiT call writes the block's K/V into its window."""
        return self.mode == KV_PER_STEP or (self.mode == KV_LAST_STEP and step == self.steps - 1)

    @property
    def motion_lag_blocks(self) -> int:
        """Newest blocks left out of the next clip's motion context.

        With one GPU per step the last `steps - 1` blocks of a clip are still on their way through the
        pipeline when the next clip's first block starts; per_step defines the clip boundary that way
        on one process too, so both give the same frames. The left-out blocks are exactly the ones the
        KV window still holds when kv_cache_blocks - 1 == steps - 1 (the 14B preset: 3 and 4 steps).
        """
        return self.steps - 1 if self.mode == KV_PER_STEP else 0


StepDenoiser = Callable[[torch.Tensor, torch.Tensor, int], torch.Tensor]  # (latents, timestep [B], step) -> velocity


def denoise_steps(denoiser: StepDenoiser, noise: torch.Tensor, schedule: FlowMatchSchedule) -> DenoisedBlock:
    """`denoise_block` for a denoiser that also gets the step index (it picks the step's KV window)."""
    x = noise
    for step, t in enumerate(schedule.timesteps.tolist()):
        timestep = torch.full((noise.shape[0],), t, dtype=torch.float32, device=noise.device)
        x = euler_step(x, denoiser(x, timestep, step), schedule, step)
    return DenoisedBlock(x, schedule.sample_steps)
