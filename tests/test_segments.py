"""Per-crystal sums and means: the same numbers as torch_geometric's scatter and as a loop over crystals."""

import torch
from torch_geometric.utils import scatter

from equicsp.model.segments import per_crystal_mean, per_crystal_sum


def test_per_crystal_sums_and_means_match_pyg_and_a_loop_on_random_batches_with_empty_crystals():
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        counts = torch.randint(0, 6, (int(torch.randint(1, 9, (1,), generator=generator)),), generator=generator)
        batch = torch.repeat_interleave(torch.arange(len(counts)), counts)
        values = torch.randn(int(counts.sum()), 3, 2, generator=generator, dtype=torch.float64)
        summed, mean = per_crystal_sum(values, batch, len(counts)), per_crystal_mean(values, batch, len(counts))
        assert torch.allclose(summed, scatter(values, batch, dim=0, dim_size=len(counts), reduce="sum"))
        assert torch.allclose(mean, scatter(values, batch, dim=0, dim_size=len(counts), reduce="mean"))
        for crystal, rows in enumerate(values.split(counts.tolist())):
            expected = rows.mean(0) if len(rows) else torch.zeros(3, 2, dtype=torch.float64)
            assert torch.allclose(mean[crystal], expected) and torch.allclose(summed[crystal], rows.sum(0))
