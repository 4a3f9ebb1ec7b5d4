import torch
from scipy import stats
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode

from equicsp.model.noise import keyed_normal, keyed_uniform, sample_keys


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


class RecordedOps(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


def test_a_keyed_draw_in_a_step_uploads_nothing_and_numbers_no_counter_by_arange():
    """On a GPU, a tensor made from host values each step is an upload that waits for the device (it was the
    sampler's one sync per step), and `arange * 2654435769` became 32-bit index arithmetic in inductor's
    kernels, which failed to compile on an H100 ("Scalar 2654435769 is out of range for type int32")."""
    keys = sample_keys(torch.arange(10), torch.zeros(10, dtype=torch.long))
    step = torch.tensor(4)
    expected = keyed_normal(keys, 3, 5, step, 2), keyed_uniform(keys, 3, 5, step, 1)
    with RecordedOps() as ops:
        drawn = keyed_normal(keys, 3, 5, step, 2), keyed_uniform(keys, 3, 5, step, 1)
    assert not ops.names & {"lift_fresh", "arange"}
    assert all(torch.equal(a, b) for a, b in zip(drawn, expected))
    assert torch.equal(drawn[0], keyed_normal(keys, 3, 5, 4, 2))  # the same draws as with a Python int step


def test_draws_under_fake_tensors_leave_real_draws_real():
    """The device constants are cached: one made under a fake-tensor mode (the no-sync tests trace the sampler
    that way) was kept and handed to later real draws, which then failed."""
    keys = sample_keys(torch.arange(6), torch.zeros(6, dtype=torch.long))
    step = torch.tensor(3)
    with FakeTensorMode(allow_non_fake_inputs=True):
        keyed_normal(keys, 3, 11, step, 7)
    drawn = keyed_normal(keys, 3, 11, step, 7)
    assert not isinstance(drawn, FakeTensor) and torch.equal(drawn, keyed_normal(keys, 3, 11, 3, 7))
