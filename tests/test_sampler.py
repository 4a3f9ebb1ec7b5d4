import math

import torch
from conftest import FAST
from oracle import OracleDenoiser

from equicsp.config import make_config
from equicsp.data.batches import DeviceCrystals
from equicsp.engine.sampler import Sampler, timestep_sequence
from equicsp.engine.training import train
from equicsp.evaluation.csp import score
from equicsp.model.denoiser import DenoiserOutput, build_denoiser
from equicsp.model.diffusion import Diffusion
from equicsp.model.noise import atom_keys, keyed_uniform, sample_keys

SMALL = {"model.num_layers": 1, "model.hidden_dim": 16, "model.num_freqs": 4, "model.time_dim": 8,
         "diffusion.timesteps": 30}


def test_timestep_sequences():
    assert timestep_sequence(10, 0) == list(range(10, 0, -1))
    strided = timestep_sequence(1000, 50)
    assert strided[0] == 1000 and strided[-1] == 1 and len(strided) == 50
    assert all(a > b for a, b in zip(strided, strided[1:]))


def test_an_oracle_denoiser_is_sampled_back_to_the_crystals(tiny_dataset):
    """The sampler's arithmetic alone: with exact targets every crystal is recovered."""
    batch = DeviceCrystals(tiny_dataset, "cpu").batch(list(range(len(tiny_dataset))))
    for preset in ("equicsp", "diffcsp"):
        config = make_config("smoke", preset, {"sampler.step_lr": 1e-5})
        diffusion = Diffusion(config)
        oracle = OracleDenoiser(diffusion, batch.frac_coords, diffusion.lattice.encode(batch.lengths, batch.angles))
        compositions = [batch.atom_types[batch.batch == i] for i in range(len(tiny_dataset))]
        predictions = Sampler(oracle, diffusion, config).sample(compositions, 1, seed=0, show_progress=False)
        summary, _ = score(tiny_dataset, list(range(len(tiny_dataset))), predictions, 1, processes=1,
                           show_progress=False)
        assert summary.match_rate == 1.0, preset
        assert summary.rmse < 0.02, preset


def test_samples_depend_on_seed_and_index_not_on_batching():
    config = make_config("smoke", "equicsp", SMALL)
    torch.manual_seed(0)
    model = build_denoiser(config)
    diffusion = Diffusion(config)
    compositions = [torch.tensor([8, 8, 8, 22, 38]), torch.tensor([6, 6]), torch.tensor([8, 8, 8, 22, 56])]
    whole = Sampler(model, diffusion, config).sample(compositions, 2, seed=3, show_progress=False)
    small_batches = make_config("smoke", "equicsp", {**SMALL, "sampler.batch_size": 1})
    pieces = Sampler(model, diffusion, small_batches).sample(compositions[2:], 2, seed=3, indices=[2],
                                                              show_progress=False)
    for piece in pieces:
        match = next(c for c in whole if (c.composition_index, c.sample_index) == (2, piece.sample_index))
        torch.testing.assert_close(piece.frac_coords, match.frac_coords, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(piece.lengths, match.lengths, rtol=1e-5, atol=1e-5)
    assert not torch.equal(whole[0].frac_coords, whole[1].frac_coords)  # two samples of one composition differ
    again = Sampler(model, diffusion, config).sample(compositions, 2, seed=4, show_progress=False)
    assert not torch.equal(again[0].frac_coords, whole[0].frac_coords)


class ZeroDenoiser(torch.nn.Module):
    """Predicts no noise and no score: sampling then moves the coordinates by its injected noise alone."""

    def forward(self, atom_types, frac_coords, lattice, timesteps, batch, num_atoms, sizes=None, real=None) -> DenoiserOutput:
        return DenoiserOutput(torch.zeros_like(lattice), torch.zeros_like(frac_coords), torch.zeros_like(frac_coords))


def test_the_last_step_adds_no_noise():
    """At t = 1 neither corrector nor predictor adds noise (both reference codes use z = 0 there)."""
    config = make_config("smoke", "diffcsp", {"diffusion.timesteps": 1, "sampler.step_lr": 1e-3})
    diffusion = Diffusion(config)
    keys = sample_keys(torch.tensor([0, 1]), torch.tensor([0, 0]))
    num_atoms = torch.tensor([3, 2])
    x, _ = Sampler(ZeroDenoiser(), diffusion, config).sample_batch(torch.tensor([8, 8, 22, 6, 6]), num_atoms, keys, seed=2)
    batch = torch.repeat_interleave(torch.arange(2), num_atoms)
    initial = keyed_uniform(atom_keys(keys, batch, num_atoms), 3, 2, 0, 3)  # the initial-coordinates stream
    torch.testing.assert_close(x, initial)


def test_the_diffcsp_arm_trains_and_samples_on_the_lattice_matrix(tiny_data_dir, tmp_path):
    config = make_config("smoke", "diffcsp", {**FAST, "data.path": str(tiny_data_dir), "optim.epochs": 3})
    assert config.objective.lattice == "matrix"
    loop = train(config, tmp_path / "run", show_progress=False)
    assert all(math.isfinite(row["train_total"]) for row in loop.state.history)
    assert loop.model.lattice_head.out_features == 9
    crystals = Sampler(loop.model, loop.diffusion, config).sample([torch.tensor([8, 8, 8, 22, 38])], 2, show_progress=False)
    for crystal in crystals:
        assert torch.isfinite(crystal.frac_coords).all() and torch.isfinite(crystal.lengths).all()
        assert ((crystal.angles > 0) & (crystal.angles < 180)).all()
