"""CSPNet, the denoiser (docs/method.md#denoiser), and its Frame-Average wrapper.

Message passing over the fully connected graph of each crystal, self edges included:
m_ij = phi_m(h_i, h_j, f(l), FT(w(x_j - x_i))), h_i += phi_h(h_i, mean_j m_ij), pre-layer-norm.
f(l) is what the lattice representation shows the network: the projected parameters
themselves, or DiffCSP's inner products L L^T.

Two exact rewrites make it cheaper than the reference code without changing the function:
- phi_m's first Linear acts on a concatenation, so it is a sum of per-part Linears; the
  h_i and h_j parts are applied per atom (N rows) and gathered, not per edge (sum N^2 rows).
- FT(d) = [sin(2 pi k d), cos(2 pi k d)] and w(x_i - x_j) = 1 - w(x_j - x_i) flips the sine
  and keeps the cosine, so the Fourier part of every layer is computed once per forward, for
  unordered pairs i < j only; edge (j, i) reuses it with the sine part negated, and a self edge
  (d = 0) is a constant.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import cast

import torch
from torch import nn

from equicsp.config import Config, ModelConfig
from equicsp.data.batches import GraphSizes
from equicsp.data.crystals import MAX_ATOMIC_NUMBER
from equicsp.model.atom_types import NUM_TYPE_CLASSES
from equicsp.model.lattice import (
    LATTICE_REPRESENTATIONS,
    NUM_PERMUTATIONS,
    LatticeRepresentation,
    inverse_permutation_index,
    permute_columns,
    permute_lattice,
)
from equicsp.model.schedules import wrap
from equicsp.model.segments import per_crystal_mean
from equicsp.task import task_of


@dataclass
class DenoiserOutput:
    lattice_noise: torch.Tensor  # (B, D) eps_hat_l in the lattice representation
    coord_noise: torch.Tensor  # (N, 3) xhat: the CoM-free noise n~, normalised
    coord_score: torch.Tensor  # (N, 3) shat: the score target, normalised
    type_noise: torch.Tensor | None = None  # (N, 100) eps_hat of the atom types (generation), else None


@dataclass(frozen=True)
class CrystalGraph:
    """Fully connected directed edges of each crystal, i-major, plus the unordered pairs i < j.

    Built by index arithmetic from the atom counts alone: no loop over crystals, and, when
    the host gives the batch's sizes, no host synchronisation either.
    """

    source: torch.Tensor  # (E,) atom i of edge (i, j); messages are averaged onto i
    target: torch.Tensor  # (E,) atom j
    edge_crystal: torch.Tensor  # (E,)
    pair_source: torch.Tensor  # (P,) i of each pair i < j
    pair_target: torch.Tensor  # (P,) j
    edge_slot: torch.Tensor  # (E,) row of the Fourier table: pair p (i<j), P + p (i>j), 2P (self)

    @classmethod
    def fully_connected(cls, num_atoms: torch.Tensor, sizes: GraphSizes | None = None,
                        real: torch.Tensor | None = None) -> CrystalGraph:
        """num_atoms (B,) on the model's device; sizes: the tensors' shapes, from the host (else read back from the
        device); real (B,) bool marks the real crystals of a padded batch (batches.py): padding crystals get no
        edges, and the edges and pairs left over join the last atom, a padding one, to itself."""
        if sizes is None:
            sizes = GraphSizes.of(num_atoms.cpu())
        atom_offsets = torch.cumsum(num_atoms, 0) - num_atoms  # (B,)
        connected = num_atoms if real is None else torch.where(real, num_atoms, 0)
        edge_crystal, local, spare_edge = _segments(connected * connected, sizes.edges)
        n = connected[edge_crystal].clamp_min(1)
        local_i, local_j = local // n, local % n
        # Pairs are numbered j-major inside a crystal: (i, j) with i < j is pair j (j - 1) / 2 + i.
        pairs_per_crystal = connected * (connected - 1) // 2
        pair_offsets = torch.cumsum(pairs_per_crystal, 0) - pairs_per_crystal
        low, high = torch.minimum(local_i, local_j), torch.maximum(local_i, local_j)
        pair = pair_offsets[edge_crystal] + high * (high - 1) // 2 + low
        slot = torch.where(local_i < local_j, pair, pair + sizes.pairs)
        slot = torch.where((local_i == local_j) | spare_edge, 2 * sizes.pairs, slot)
        pair_crystal, pair_local, spare_pair = _segments(pairs_per_crystal, sizes.pairs)
        pair_i, pair_j = triangle_pair(pair_local)
        spare_atom = sizes.atoms - 1
        base = atom_offsets[pair_crystal]
        edge_base = atom_offsets[edge_crystal]
        return cls(source=torch.where(spare_edge, spare_atom, edge_base + local_i),
                   target=torch.where(spare_edge, spare_atom, edge_base + local_j), edge_crystal=edge_crystal,
                   pair_source=torch.where(spare_pair, spare_atom, base + pair_i),
                   pair_target=torch.where(spare_pair, spare_atom, base + pair_j), edge_slot=slot)


def _segments(lengths: torch.Tensor, total: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions 0 .. total - 1 cut into consecutive segments of these lengths: each position's segment, its
    place in it, and whether it lies past the last segment (then segment and place are those of a last position).

    A sorted search rather than repeat_interleave, so `total` may exceed the lengths' sum (padding).
    """
    ends = torch.cumsum(lengths, 0)
    position = torch.arange(total, device=lengths.device)
    segment = torch.searchsorted(ends, position, right=True)
    spare = segment >= lengths.shape[0]
    segment = segment.clamp(max=lengths.shape[0] - 1)
    local = torch.where(spare, 0, position - (ends - lengths)[segment])
    return segment, local, spare


def triangle_pair(k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The pair (i, j), i < j, numbered k = j (j - 1) / 2 + i (j-major)."""
    j = ((1 + torch.sqrt(1 + 8 * k.double())) / 2).floor().long()
    j = torch.where(j * (j - 1) // 2 > k, j - 1, j)  # guard the square root's rounding either way
    j = torch.where((j + 1) * j // 2 <= k, j + 1, j)
    return k - j * (j - 1) // 2, j


def sinusoidal_embedding(timesteps: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) integer timesteps -> (B, dim) [sin, cos] at geometric frequencies (DiffCSP's)."""
    half = dim // 2
    frequencies = torch.exp(torch.arange(half, device=timesteps.device) * (-math.log(10000) / max(half - 1, 1)))
    angles = timesteps.float()[:, None] * frequencies[None, :]
    return torch.cat([angles.sin(), angles.cos()], dim=-1)


def init_as_one_linear(*parts: nn.Linear) -> None:
    """Initialise Linears that together stand for one Linear on their concatenated inputs as that Linear is
    initialised in the reference codes: PyTorch's default, uniform in +-1/sqrt(fan_in), fan_in being the whole
    concatenation's width. Each part's own default would be sqrt(total / part) times wider: for the lattice's inputs
    of a 6 x 512 layer 17x (6 projected parameters) or 14x (DiffCSP's 9 entries of L L^T, which reach 100 A^2)."""
    bound = 1 / math.sqrt(sum(part.in_features for part in parts))
    with torch.no_grad():
        for part in parts:
            part.weight.uniform_(-bound, bound)
            if part.bias is not None:
                part.bias.uniform_(-bound, bound)


class CSPLayer(nn.Module):
    def __init__(self, hidden: int, fourier_dim: int, lattice_dim: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        # The first Linear of phi_m, split by the parts of its input (h_i, h_j, l, FT).
        self.edge_source = nn.Linear(hidden, hidden)
        self.edge_target = nn.Linear(hidden, hidden, bias=False)
        self.edge_lattice = nn.Linear(lattice_dim, hidden, bias=False)
        self.edge_fourier = nn.Linear(fourier_dim, hidden, bias=False)
        self.edge_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        # phi_h's first Linear on (h_i, mean_j m_ij), split in two to skip the concatenation.
        self.node_self = nn.Linear(hidden, hidden)
        self.node_messages = nn.Linear(hidden, hidden, bias=False)
        self.node_out = nn.Sequential(nn.SiLU(), nn.Linear(hidden, hidden), nn.SiLU())
        init_as_one_linear(self.edge_source, self.edge_target, self.edge_lattice, self.edge_fourier)
        init_as_one_linear(self.node_self, self.node_messages)

    def forward(self, h: torch.Tensor, lattice_features: torch.Tensor, edge_fourier: torch.Tensor,
                graph: CrystalGraph, batch: torch.Tensor, atoms_per_atom: torch.Tensor) -> torch.Tensor:
        normed = self.norm(h)
        # The lattice term is per crystal: add it per atom before it reaches the edges.
        source = self.edge_source(normed) + self.edge_lattice(lattice_features).index_select(0, batch)  # (N, hidden)
        target = self.edge_target(normed)
        pre = source.index_select(0, graph.source) + target.index_select(0, graph.target) + edge_fourier
        messages = self.edge_out(pre)  # (E, hidden)
        # index_add is an order of magnitude faster on CPU than scatter's broadcast index or segment_reduce.
        summed = torch.index_add(messages.new_zeros(h.shape[0], messages.shape[1]), 0, graph.source, messages)
        aggregated = summed / atoms_per_atom.unsqueeze(-1).to(summed.dtype)  # each atom has its crystal's n edges
        return h + self.node_out(self.node_self(normed) + self.node_messages(aggregated))


class CSPNet(nn.Module):
    frequencies: torch.Tensor  # the buffer registered in __init__

    def __init__(self, config: ModelConfig, lattice: LatticeRepresentation = LATTICE_REPRESENTATIONS["projected"],
                 diffuse_types: bool = False):
        super().__init__()
        self.config = config
        self.lattice = lattice
        hidden, k = config.hidden_dim, config.num_freqs
        # CSP embeds the given atomic numbers; generation sees noisy one-hot vectors (N, 100) and predicts their noise.
        self.atom_embedding = (nn.Linear(NUM_TYPE_CLASSES, hidden) if diffuse_types
                               else nn.Embedding(MAX_ATOMIC_NUMBER + 1, hidden))
        self.type_head = nn.Linear(hidden, NUM_TYPE_CLASSES) if diffuse_types else None
        self.input_mlp = nn.Linear(hidden + config.time_dim, hidden)
        self.register_buffer("frequencies", 2 * math.pi * torch.arange(k, dtype=torch.float32), persistent=False)
        self.layers = nn.ModuleList([CSPLayer(hidden, 6 * k, lattice.feature_dim) for _ in range(config.num_layers)])
        self.final_norm = nn.LayerNorm(hidden)
        self.lattice_head = nn.Linear(hidden, lattice.dim, bias=False)
        self.coord_head = nn.Linear(hidden, 3, bias=False)
        self.score_head = nn.Linear(hidden, 3, bias=False)

    def fourier_tables(self, frac_coords: torch.Tensor, graph: CrystalGraph) -> list[torch.Tensor]:
        """Each layer's FT projection, (2P + 1, hidden): rows for the i<j pairs, the i>j pairs and self edges.

        One table per layer rather than one (2P + 1, L * hidden) table sliced per layer: the backward of
        L slices fills and adds L zero tables of the whole size (or stacks the L gradients into one).
        """
        k3 = 3 * self.config.num_freqs
        distance = wrap(frac_coords[graph.pair_target] - frac_coords[graph.pair_source])  # (P, 3)
        angles = (distance.unsqueeze(-1) * self.frequencies).flatten(1)  # (P, 3K), axis-major
        sines, cosines = angles.sin(), angles.cos()
        tables = []
        # nn.ModuleList is not generic: its items are the CSPLayers __init__ built.
        for layer in cast("Sequence[CSPLayer]", self.layers):
            sin_weight, cos_weight = layer.edge_fourier.weight[:, :k3], layer.edge_fourier.weight[:, k3:]
            sin_part = sines @ sin_weight.T.to(angles.dtype)
            cos_part = cosines @ cos_weight.T.to(angles.dtype)
            self_edge = cos_weight.sum(-1).to(cos_part.dtype)[None]  # d = 0: sin = 0, cos = 1
            tables.append(torch.cat([cos_part + sin_part, cos_part - sin_part, self_edge], dim=0))
        return tables

    def forward(self, atom_types: torch.Tensor, frac_coords: torch.Tensor, lattice: torch.Tensor,
                timesteps: torch.Tensor, batch: torch.Tensor, num_atoms: torch.Tensor,
                sizes: GraphSizes | None = None, real: torch.Tensor | None = None) -> DenoiserOutput:
        """atom_types (N,) atomic numbers, or (N, 100) noisy one-hots (generation); frac_coords (N, 3),
        lattice (B, D) in its representation, timesteps (B,), batch (N,), num_atoms (B,); sizes: the batch's
        graph sizes known on the host (else read back from the device); real: (B,) the real crystals of a
        padded batch (batches.py), None when nothing is padded."""
        graph = CrystalGraph.fully_connected(num_atoms, sizes, real)
        atoms_per_atom = num_atoms[batch]
        time = sinusoidal_embedding(timesteps, self.config.time_dim)[batch]
        h = self.input_mlp(torch.cat([self.atom_embedding(atom_types), time], dim=-1))
        lattice_features = self.lattice.features(lattice)
        for layer, table in zip(self.layers, self.fourier_tables(frac_coords, graph)):
            h = layer(h, lattice_features, table.index_select(0, graph.edge_slot), graph, batch, atoms_per_atom)
        h = self.final_norm(h)
        num_crystals = num_atoms.shape[0]
        crystal_h = per_crystal_mean(h, batch, num_crystals)
        # Heads leave autocast's bf16 as float32; a float64 model stays float64.
        out_dtype = torch.promote_types(frac_coords.dtype, torch.float32)
        coord_noise, coord_score = self.coord_head(h).to(out_dtype), self.score_head(h).to(out_dtype)
        if self.config.context_mean:
            coord_noise = coord_noise + per_crystal_mean(coord_noise, batch, num_crystals)[batch]
            coord_score = coord_score + per_crystal_mean(coord_score, batch, num_crystals)[batch]
        lattice_noise = self.lattice.network_noise(self.lattice_head(crystal_h).to(out_dtype), lattice)
        type_noise = self.type_head(h).to(out_dtype) if self.type_head is not None else None
        return DenoiserOutput(lattice_noise, coord_noise, coord_score, type_noise)


class FrameAveraged(nn.Module):
    """Average P^-1 phi(P M) over the six axis permutations: exactly permutation-equivariant.

    The six permuted copies go through the network as one batch.
    """

    def __init__(self, network: CSPNet):
        super().__init__()
        self.network = network

    @property
    def config(self) -> ModelConfig:
        return self.network.config

    def forward(self, atom_types: torch.Tensor, frac_coords: torch.Tensor, lattice: torch.Tensor, timesteps: torch.Tensor,
                batch: torch.Tensor, num_atoms: torch.Tensor, sizes: GraphSizes | None = None,
                real: torch.Tensor | None = None) -> DenoiserOutput:
        num_crystals, total_atoms = num_atoms.shape[0], atom_types.shape[0]
        device = lattice.device
        perms = torch.arange(NUM_PERMUTATIONS, device=device).repeat_interleave(num_crystals)  # (6B,)
        copies = torch.arange(NUM_PERMUTATIONS, device=device)
        stacked_batch = (batch[None, :] + copies[:, None] * num_crystals).flatten()  # (6N,)
        out = self.network(
            atom_types.repeat(NUM_PERMUTATIONS, *[1] * (atom_types.dim() - 1)),
            permute_columns(frac_coords.repeat(NUM_PERMUTATIONS, 1), perms, stacked_batch),
            permute_lattice(lattice.repeat(NUM_PERMUTATIONS, 1), perms),
            timesteps.repeat(NUM_PERMUTATIONS), stacked_batch, num_atoms.repeat(NUM_PERMUTATIONS),
            None if sizes is None else sizes.repeated(NUM_PERMUTATIONS),
            None if real is None else real.repeat(NUM_PERMUTATIONS))
        inverse = inverse_permutation_index(perms)
        lattice_noise = permute_lattice(out.lattice_noise, inverse).view(NUM_PERMUTATIONS, num_crystals, 6)
        coord = permute_columns(out.coord_noise, inverse, stacked_batch).view(NUM_PERMUTATIONS, total_atoms, 3)
        score = permute_columns(out.coord_score, inverse, stacked_batch).view(NUM_PERMUTATIONS, total_atoms, 3)
        # Atom types do not move under an axis permutation: their noise is averaged as is.
        types = None if out.type_noise is None else out.type_noise.view(NUM_PERMUTATIONS, total_atoms, -1).mean(0)
        return DenoiserOutput(lattice_noise.mean(0), coord.mean(0), score.mean(0), types)


def build_denoiser(config: Config) -> nn.Module:
    """CSPNet for the config's model and lattice representation, Frame-Averaged when the objective says so."""
    network = CSPNet(config.model, LATTICE_REPRESENTATIONS[config.objective.lattice],
                     diffuse_types=task_of(config).diffuses_types)
    return FrameAveraged(network) if config.objective.frame_average else network

