"""Crystal batches cut from flat tensors that live on the training device.

A dataset is moved to the device once, as flat tensors; a batch is a list of crystal indices
(chosen on the host, where the shuffling is seeded) turned into atom indices by index
arithmetic on the device. The host knows every crystal's size, so it also knows each
batch's atom, edge and pair counts: the device never has to be asked for a size, and a
training or sampling step runs without a host synchronisation.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from equicsp.data import CrystalDataset


@dataclass(frozen=True)
class GraphSizes:
    """Host-side sizes of a batch's fully connected crystal graphs."""

    crystals: int
    atoms: int
    edges: int  # sum n^2: ordered pairs, self edges included
    pairs: int  # sum n (n - 1) / 2: unordered pairs i < j

    @classmethod
    def of(cls, num_atoms: torch.Tensor | list[int]) -> "GraphSizes":
        """From the crystals' atom counts held on the host (a list, or a CPU tensor)."""
        counts = num_atoms.tolist() if isinstance(num_atoms, torch.Tensor) else list(num_atoms)
        return cls(len(counts), sum(counts), sum(n * n for n in counts), sum(n * (n - 1) // 2 for n in counts))

    def repeated(self, copies: int) -> "GraphSizes":
        """The sizes of `copies` stacked copies of this batch (the permutation loss, Frame Average)."""
        return GraphSizes(self.crystals * copies, self.atoms * copies, self.edges * copies, self.pairs * copies)


@dataclass
class CrystalBatch:
    """The attributes the objective and the denoiser read, as a PyG batch would hold them."""

    atom_types: torch.Tensor  # (N,)
    frac_coords: torch.Tensor  # (N, 3)
    lengths: torch.Tensor  # (B, 3)
    angles: torch.Tensor  # (B, 3)
    num_atoms: torch.Tensor  # (B,)
    batch: torch.Tensor  # (N,) each atom's crystal in the batch
    crystal_id: torch.Tensor  # (B,) each crystal's index in its dataset: keys its noise
    sizes: GraphSizes


class DeviceCrystals:
    """A CrystalDataset's tensors on one device, cut into batches by crystal index."""

    def __init__(self, dataset: CrystalDataset, device: torch.device | str):
        self.device = torch.device(device)
        self.num_atoms_host: list[int] = dataset.num_atoms.tolist()
        self.atom_types = dataset.atom_types.to(self.device)
        self.frac_coords = dataset.frac_coords.to(self.device)
        self.lengths = dataset.lengths.to(self.device)
        self.angles = dataset.angles.to(self.device)
        self.num_atoms = dataset.num_atoms.to(self.device)
        self.first_atom = (torch.cumsum(dataset.num_atoms, 0) - dataset.num_atoms).to(self.device)

    def __len__(self) -> int:
        return len(self.num_atoms_host)

    def batch(self, indices: list[int]) -> CrystalBatch:
        """The crystals at these dataset indices, in this order."""
        sizes = GraphSizes.of([self.num_atoms_host[i] for i in indices])
        index = torch.tensor(indices, dtype=torch.long, device=self.device)
        counts = self.num_atoms[index]  # (B,)
        crystal_of_atom = torch.repeat_interleave(torch.arange(sizes.crystals, device=self.device), counts,
                                                  output_size=sizes.atoms)
        first_in_batch = torch.cumsum(counts, 0) - counts
        local = torch.arange(sizes.atoms, device=self.device) - first_in_batch[crystal_of_atom]
        atoms = self.first_atom[index][crystal_of_atom] + local  # (N,) rows of the flat atom tensors
        return CrystalBatch(atom_types=self.atom_types[atoms], frac_coords=self.frac_coords[atoms],
                            lengths=self.lengths[index], angles=self.angles[index], num_atoms=counts,
                            batch=crystal_of_atom, crystal_id=index, sizes=sizes)
