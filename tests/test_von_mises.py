import numpy as np
import pytest
import torch
from scipy.stats import vonmises

from equicsp.model.periodic import TWO_PI
from equicsp.model.schedules import geometric_sigmas, wrap_centered
from equicsp.model.von_mises import build_tables, draw_com_free_noise, load_or_build_tables, mean_resultant_to_kappa


def test_kappa_solver_matches_scipy_fit_on_the_same_draws():
    sigmas = geometric_sigmas(50, 0.005, 0.5)
    for num_atoms in (2, 5, 13):
        draws = draw_com_free_noise(num_atoms, sigmas, 4000, torch.Generator().manual_seed(num_atoms))
        for step in (0, 20, 35, 49):
            theta = (TWO_PI * wrap_centered(draws[step])).flatten().numpy()
            ours = mean_resultant_to_kappa(np.cos(theta).mean())
            theirs, _, _ = vonmises.fit(theta, floc=0, fscale=1)
            np.testing.assert_allclose(ours, theirs, rtol=1e-4)


def test_tables_hold_the_fit_of_their_own_draws():
    sigmas = geometric_sigmas(20, 0.005, 0.5)
    tables = build_tables(6, sigmas, num_samples=3000, seed=7)
    generator = torch.Generator().manual_seed(7 * 1_000_003 + 4)
    draws = wrap_centered(draw_com_free_noise(4, sigmas.float(), 3000, generator))
    for step in (0, 10, 19):
        theta = (TWO_PI * draws[step]).flatten().double().numpy()
        expected, _, _ = vonmises.fit(theta, floc=0, fscale=1)
        np.testing.assert_allclose(float(tables.kappa[4, step + 1]), expected, rtol=2e-3)
        np.testing.assert_allclose(float(tables.noise_norm[4, step + 1]), (draws[step].double() ** 2).mean(), rtol=1e-5)
    # A one-atom crystal has no CoM-free noise: normalisers 1, kappa 0, never NaN.
    assert (tables.kappa[1] == 0).all() and (tables.von_mises_score_norm[1] == 1).all()
    assert all(torch.isfinite(getattr(tables, name)).all() for name in ("kappa", "von_mises_score_norm", "noise_norm"))


def test_kappa_grows_as_noise_shrinks_and_with_atoms():
    sigmas = geometric_sigmas(30, 0.005, 0.5)
    tables = build_tables(8, sigmas, num_samples=2000)
    # Where sigma nears 0.5 the wrapped noise is almost uniform and kappa flattens out into MC noise.
    kappa = tables.kappa[2:, 1:][:, sigmas < 0.2]
    assert (kappa[:, 1:] < kappa[:, :-1]).all()  # larger sigma, flatter distribution
    # n~ of more atoms is closer to the raw noise: its kappa approaches 1 / (2 pi sigma)^2 from above.
    assert (kappa[-1] < kappa[0]).all()


def test_cached_tables_are_reused(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path))
    sigmas = geometric_sigmas(10, 0.005, 0.5)
    first = load_or_build_tables(4, sigmas, 1000, 0)
    files = list((tmp_path / "von_mises").glob("*.pt"))
    assert len(files) == 1
    second = load_or_build_tables(4, sigmas, 1000, 0)
    torch.testing.assert_close(first.kappa, second.kappa)
    other = load_or_build_tables(4, sigmas, 1000, 1)
    assert other.key != first.key and len(list((tmp_path / "von_mises").glob("*.pt"))) == 2


def test_a_truncated_cache_file_is_named_and_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path))
    sigmas = geometric_sigmas(10, 0.005, 0.5)
    first = load_or_build_tables(4, sigmas, 1000, 0)
    [cached] = (tmp_path / "von_mises").glob("*.pt")
    cached.write_bytes(cached.read_bytes()[:200])
    with pytest.warns(UserWarning, match=f"cache file {cached} is unreadable.*rebuilding"):
        again = load_or_build_tables(4, sigmas, 1000, 0)
    torch.testing.assert_close(again.kappa, first.kappa)
    torch.testing.assert_close(load_or_build_tables(4, sigmas, 1000, 0).kappa, first.kappa)  # the rebuilt file reads


def test_building_the_tables_is_announced_and_a_cached_read_is_silent(tmp_path, monkeypatch):
    """With the paper's 1000 steps the build takes minutes on a CPU (4.4 min under load): the user hears why."""
    monkeypatch.setenv("EQUICSP_CACHE_DIR", str(tmp_path))
    sigmas = geometric_sigmas(10, 0.005, 0.5)
    told = []
    load_or_build_tables(4, sigmas, 1000, 0, announce=told.append)
    assert told == ["building von Mises tables (atom counts up to 4 x 10 noise levels, 1,000 draws each; "
                    "cached for the next run)..."]
    load_or_build_tables(4, sigmas, 1000, 0, announce=told.append)
    assert len(told) == 1
