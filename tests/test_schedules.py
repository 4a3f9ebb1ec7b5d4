import math

import torch

from equicsp.model.schedules import NoiseSchedule, cosine_betas, wrapped_normal_score


def reference_score(x: torch.Tensor, sigma: torch.Tensor, images: int = 10) -> torch.Tensor:
    """Minus the wrapped-normal score by a float64 log-sum-exp over images of the raw x."""
    k = torch.arange(-images, images + 1, dtype=torch.float64)
    shifted = (x - torch.round(x))[:, None] + k
    log_density = -shifted**2 / (2 * sigma[:, None] ** 2)
    weights = torch.softmax(log_density, dim=-1)
    return (weights * shifted).sum(-1) / sigma**2


def test_wrapped_normal_score_matches_float64_image_sum():
    generator = torch.Generator().manual_seed(0)
    x = 4 * torch.rand(5000, generator=generator, dtype=torch.float64) - 2
    sigma = torch.exp(torch.empty(5000, dtype=torch.float64).uniform_(math.log(1e-3), math.log(0.8), generator=generator))
    torch.testing.assert_close(wrapped_normal_score(x, sigma), reference_score(x, sigma), rtol=1e-9, atol=1e-9)


def test_wrapped_normal_score_is_periodic_and_odd():
    x = torch.rand(100, dtype=torch.float64) - 0.5
    sigma = torch.full_like(x, 0.3)
    torch.testing.assert_close(wrapped_normal_score(x + 3, sigma), wrapped_normal_score(x, sigma))
    torch.testing.assert_close(wrapped_normal_score(-x, sigma), -wrapped_normal_score(x, sigma))


def test_cosine_schedule_is_clipped_and_decreasing():
    betas = cosine_betas(1000)
    assert betas.min() >= 1e-4 and betas.max() <= 0.9999
    alpha_bar = torch.cumprod(1 - betas, 0)
    assert (alpha_bar[1:] < alpha_bar[:-1]).all()


def test_score_normaliser_matches_monte_carlo():
    schedule = NoiseSchedule.build(10, 0.005, 0.5)
    generator = torch.Generator().manual_seed(1)
    for t in (1, 5, 10):
        sigma = schedule.sigmas[t]
        noise = sigma * torch.randn(400_000, generator=generator, dtype=torch.float64)
        estimate = (wrapped_normal_score(noise, sigma.expand_as(noise)) ** 2).mean()
        assert abs(float(estimate / schedule.score_norms[t]) - 1) < 0.01
