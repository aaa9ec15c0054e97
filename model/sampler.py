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
    x = noise
    calls = 0
    for step, t in enumerate(schedule.timesteps.tolist()):
        timestep = torch.full((noise.shape[0],), t, dtype=torch.float32, device=noise.device)
        velocity = denoiser(x, timestep)
        calls += 1
        d_sigma = float(schedule.sigmas[step + 1] - schedule.sigmas[step])
        x = (x.float() + d_sigma * velocity.float()).to(noise.dtype)
    return DenoisedBlock(x, calls)
