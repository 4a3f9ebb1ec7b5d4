import torch
from scipy import stats

from equicsp.noise import keyed_normal, keyed_uniform, sample_keys


def test_keyed_normals_are_standard_normal():
    keys = sample_keys(torch.arange(2000), torch.zeros(2000, dtype=torch.long))
    draws = keyed_normal(keys, 25, seed=3, step=7, stream=1).flatten().double().numpy()
    assert stats.kstest(draws, "norm").pvalue > 1e-3
    uniforms = keyed_uniform(keys, 25, seed=3, step=7, stream=1).flatten().double().numpy()
    assert stats.kstest(uniforms, "uniform").pvalue > 1e-3 and uniforms.min() >= 0 and uniforms.max() < 1


def test_a_row_depends_on_its_key_only():
    keys = sample_keys(torch.arange(10), torch.zeros(10, dtype=torch.long))
    full = keyed_normal(keys, 3, 0, 5, 0)
    torch.testing.assert_close(keyed_normal(keys[[7, 2]], 3, 0, 5, 0), full[[7, 2]], rtol=0, atol=0)
    assert not torch.equal(keyed_normal(keys, 3, 1, 5, 0), full)  # another seed
    assert not torch.equal(keyed_normal(keys, 3, 0, 6, 0), full)  # another step
    assert not torch.equal(keyed_normal(keys, 3, 0, 5, 1), full)  # another stream


def test_successive_steps_and_samples_are_uncorrelated():
    keys = sample_keys(torch.arange(5000), torch.zeros(5000, dtype=torch.long))
    a = keyed_normal(keys, 1, 0, 1, 0).flatten().double().numpy()
    b = keyed_normal(keys, 1, 0, 2, 0).flatten().double().numpy()
    other = keyed_normal(sample_keys(torch.arange(5000), torch.ones(5000, dtype=torch.long)), 1, 0, 1, 0)
    assert abs(stats.pearsonr(a, b).statistic) < 0.05
    assert abs(stats.pearsonr(a, other.flatten().double().numpy()).statistic) < 0.05
