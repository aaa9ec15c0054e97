"""Few-step flow-matching schedule and the per-block Euler loop."""

from __future__ import annotations

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from model.stream.sampler import FlowMatchSchedule, denoise_block


@pytest.mark.parametrize("sample_steps", range(1, 9))
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_schedule_matches_diffusers_flow_match_euler(sample_steps: int, shift: float) -> None:
    reference = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    reference.set_timesteps(sample_steps)
    schedule = FlowMatchSchedule(sample_steps, shift)
    torch.testing.assert_close(schedule.timesteps, reference.timesteps, rtol=0, atol=1e-4)
    torch.testing.assert_close(schedule.sigmas, reference.sigmas, rtol=0, atol=1e-7)


def test_four_steps_at_shift_3_start_at_pure_noise_and_decrease() -> None:
    schedule = FlowMatchSchedule(4, 3.0)
    assert schedule.timesteps.shape == (4,)
    assert schedule.timesteps[0].item() == pytest.approx(1000.0)
    assert torch.all(schedule.timesteps[1:] < schedule.timesteps[:-1])
    assert schedule.sigmas[-1].item() == 0.0
    assert schedule.timesteps.tolist() == pytest.approx([1000.0, 857.6923, 602.1506, 8.9286], abs=1e-3)


@pytest.mark.parametrize("bad", [0, 9, -1])
def test_sample_steps_outside_1_to_8_are_rejected(bad: int) -> None:
    with pytest.raises(ValueError, match="sample_steps must be in 1..8"):
        FlowMatchSchedule(bad)


@pytest.mark.parametrize("sample_steps", [1, 2, 4, 8])
def test_denoiser_is_called_once_per_step(sample_steps: int) -> None:
    seen_timesteps: list[float] = []

    def denoiser(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        seen_timesteps.append(t[0].item())
        return torch.zeros_like(x)

    result = denoise_block(denoiser, torch.randn(2, 16, 3, 4, 4), FlowMatchSchedule(sample_steps))
    assert result.denoiser_calls == sample_steps
    assert seen_timesteps == pytest.approx(FlowMatchSchedule(sample_steps).timesteps.tolist())


def test_exact_velocity_reaches_the_clean_latents_in_any_number_of_steps() -> None:
    # For x_t = (1 - s) x0 + s n the flow velocity is n - x0; Euler with the exact velocity lands on x0.
    clean = torch.randn(1, 16, 3, 4, 4)
    noise = torch.randn_like(clean)
    for steps in (1, 3, 4, 8):
        result = denoise_block(lambda x, t: noise - clean, noise, FlowMatchSchedule(steps))
        torch.testing.assert_close(result.latents, clean, atol=1e-5, rtol=0)


def test_switching_sample_steps_between_clips_changes_the_work_done() -> None:
    calls_per_clip = []
    for steps in (4, 1, 8, 2, 4):  # the server may change sample_steps at any clip
        result = denoise_block(
            lambda x, t: torch.zeros_like(x), torch.randn(1, 16, 3, 4, 4), FlowMatchSchedule(steps)
        )
        calls_per_clip.append(result.denoiser_calls)
    assert calls_per_clip == [4, 1, 8, 2, 4]


def test_noise_to_interpolates_between_clean_and_noise() -> None:
    schedule = FlowMatchSchedule(4)
    clean, noise = torch.zeros(3), torch.ones(3)
    torch.testing.assert_close(schedule.noise_to(clean, noise, 0), noise)
    assert schedule.noise_to(clean, noise, 2)[0].item() == pytest.approx(schedule.sigmas[2].item())
