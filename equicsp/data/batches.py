"""Crystal batches cut from flat tensors that live on the training device.

A dataset is moved to the device once, as flat tensors; a batch is a list of crystal indices
(chosen on the host, where the shuffling is seeded) turned into atom indices by index
arithmetic on the device. The host knows every crystal's size, so it also knows each
batch's atom, edge and pair counts: the device never has to be asked for a size, and a
training or sampling step runs without a host synchronisation.

A compiled step (compiled.py) needs static shapes: `GraphSizes.bucket` rounds a batch's
sizes up to one of a few buckets, and a padded batch fills them. Its padding crystals come
after the real ones; the last holds every padding atom and, like the others, has no edges.
Padding edges and pairs join the last (padding) atom to itself. `real` marks the real
crystals: the graph gives padding crystals no edges, the losses leave them out, and no
real value depends on a padding one.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from equicsp.data.crystals import CrystalDataset


@dataclass(frozen=True)
class GraphSizes:
    """Host-side sizes of a batch's fully connected crystal graphs."""

    crystals: int
    atoms: int
    edges: int  # sum n^2: ordered pairs, self edges included
    pairs: int  # sum n (n - 1) / 2: unordered pairs i < j

    @classmethod
    def of(cls, num_atoms: torch.Tensor | list[int]) -> GraphSizes:
        """From the crystals' atom counts held on the host (a list, or a CPU tensor)."""
        counts = num_atoms.tolist() if isinstance(num_atoms, torch.Tensor) else list(num_atoms)
        return cls(len(counts), sum(counts), sum(n * n for n in counts), sum(n * (n - 1) // 2 for n in counts))

    @classmethod
    def bucket(cls, num_atoms: list[int], crystals: int) -> GraphSizes:
        """Static shapes for a padded batch of these crystals with room for `crystals` crystals (> len(num_atoms)).

        Edges are rounded up to the next m * 2^k with m in 8..15 (at most 12.5 % of padding),
        atoms, which need one padding atom, with m in 16..31 (6 %: a batch of equal crystals
        would otherwise pay up to 12.5 % for that one atom). Pairs follow from the two, since a
        batch's pairs are (edges - atoms) / 2: the shape is a function of two rounded numbers,
        so batches of the same crystal count and similar sizes share it, hence a compiled graph.
        """
        exact = cls.of(num_atoms)
        if crystals <= exact.crystals:
            raise ValueError(f"a padded batch of {exact.crystals} crystals needs room for more than that, not {crystals}")
        atoms, edges = round_up(exact.atoms + 1, ATOM_BITS), round_up(exact.edges)
        # Every batch in this atoms bucket has at least round_down(atoms - 1) atoms, hence at most this many pairs.
        return cls(crystals, atoms, edges, (edges - round_down(atoms - 1, ATOM_BITS)) // 2)

    def repeated(self, copies: int) -> GraphSizes:
        """The sizes of `copies` stacked copies of this batch (the permutation loss, Frame Average)."""
        return GraphSizes(self.crystals * copies, self.atoms * copies, self.edges * copies, self.pairs * copies)


ATOM_BITS = 5


def round_up(value: int, bits: int = 4) -> int:
    """The smallest m * 2^k >= value with m of `bits` bits (8..15 for 4): at most 2^(1 - bits) more (12.5 %)."""
    if value < 1 << bits:
        return value
    scale = 1 << (value.bit_length() - bits)
    return -(-value // scale) * scale


def round_down(value: int, bits: int = 4) -> int:
    """The largest m * 2^k <= value with m of `bits` bits: the grid round_up rounds onto."""
    if value < 1 << bits:
        return value
    scale = 1 << (value.bit_length() - bits)
    return value // scale * scale


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
    sizes: GraphSizes  # the tensors' shapes (crystals, atoms; the graph's edges and pairs)
    real: torch.Tensor | None = None  # (B,) bool: real crystals, padding ones False; None when nothing is padded
    real_atoms: torch.Tensor | None = None  # (N,) bool, likewise


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

    def batches(self, batches: list[list[int]], capacity: int | None = None) -> Iterator[CrystalBatch]:
        """Each list of dataset indices as a batch (see batch), the indices sent to the device in one copy
        that does not wait for the device (upload)."""
        flat = upload([i for indices in batches for i in indices], self.device)
        start = 0
        for indices in batches:
            yield self.batch(indices, capacity, flat[start:start + len(indices)])
            start += len(indices)

    def batch(self, indices: list[int], capacity: int | None = None, index: torch.Tensor | None = None) -> CrystalBatch:
        """The crystals at these dataset indices, in this order; padded to a bucket of `capacity` crystals when given.

        index: the same indices already on the device (batches sends an epoch's at once).
        """
        host_counts = [self.num_atoms_host[i] for i in indices]
        sizes = GraphSizes.of(host_counts)
        if index is None:
            index = upload(indices, self.device)
        counts = self.num_atoms[index]  # (B,)
        crystal_of_atom = torch.repeat_interleave(torch.arange(sizes.crystals, device=self.device), counts,
                                                  output_size=sizes.atoms)
        first_in_batch = torch.cumsum(counts, 0) - counts
        local = torch.arange(sizes.atoms, device=self.device) - first_in_batch[crystal_of_atom]
        atoms = self.first_atom[index][crystal_of_atom] + local  # (N,) rows of the flat atom tensors
        batch = CrystalBatch(atom_types=self.atom_types[atoms], frac_coords=self.frac_coords[atoms],
                             lengths=self.lengths[index], angles=self.angles[index], num_atoms=counts,
                             batch=crystal_of_atom, crystal_id=index, sizes=sizes)
        return batch if capacity is None else pad(batch, GraphSizes.bucket(host_counts, capacity))


def upload(values: list[int], device: torch.device) -> torch.Tensor:
    """Integers sent to the device as a long tensor without waiting for it.

    A copy from the host's pageable memory first waits for everything queued on the device; one
    from page-locked memory is queued behind it, so the host keeps running ahead (torch keeps
    the page-locked buffer alive until the copy has run).
    """
    host = torch.tensor(values, dtype=torch.long)
    if device.type == "cuda":
        return host.pin_memory().to(device, non_blocking=True)
    return host.to(device)


def pad(batch: CrystalBatch, shape: GraphSizes) -> CrystalBatch:
    """The batch filled out to `shape` (see the module's docstring); its values are placeholders that keep every
    computation finite: hydrogen at the origin of a 1 A cubic cell."""
    real = batch.sizes
    extra_crystals, extra_atoms = shape.crystals - real.crystals, shape.atoms - real.atoms
    layout = padded_layout(batch.num_atoms, batch.batch, real, shape)
    return CrystalBatch(atom_types=filled(batch.atom_types, extra_atoms, 1),
                        frac_coords=filled(batch.frac_coords, extra_atoms, 0.0),
                        lengths=filled(batch.lengths, extra_crystals, 1.0),
                        angles=filled(batch.angles, extra_crystals, 90.0),
                        num_atoms=layout.num_atoms, batch=layout.batch,
                        crystal_id=filled(batch.crystal_id, extra_crystals, -1), sizes=shape,
                        real=layout.real, real_atoms=layout.real_atoms)


def filled(tensor: torch.Tensor, rows: int, value: float) -> torch.Tensor:
    """The tensor with `rows` more rows of `value`."""
    return torch.cat([tensor, tensor.new_full((rows, *tensor.shape[1:]), value)])


@dataclass
class Layout:
    """Which crystal each atom belongs to, on the device, with the shapes known on the host."""

    sizes: GraphSizes  # the tensors' shapes
    num_atoms: torch.Tensor  # (B,)
    batch: torch.Tensor  # (N,)
    real: torch.Tensor | None = None  # (B,) bool in a padded layout, else None
    real_atoms: torch.Tensor | None = None  # (N,)

    @classmethod
    def of(cls, num_atoms: list[int], device: torch.device, capacity: int | None = None) -> Layout:
        """The layout of crystals with these atom counts (from the host); padded to a bucket of `capacity` crystals
        when given."""
        sizes = GraphSizes.of(num_atoms)
        counts = upload(num_atoms, device)
        batch = torch.repeat_interleave(torch.arange(sizes.crystals, device=device), counts, output_size=sizes.atoms)
        if capacity is None:
            return cls(sizes, counts, batch)
        return padded_layout(counts, batch, sizes, GraphSizes.bucket(num_atoms, capacity))


def padded_layout(num_atoms: torch.Tensor, batch: torch.Tensor, real: GraphSizes, shape: GraphSizes) -> Layout:
    """An exact layout of sizes `real` filled out to `shape`: padding crystals after the real ones, the last
    holding every padding atom."""
    device = num_atoms.device
    # Not `counts[-1] = ...`: assigning a Python number copies it from the host, which waits for the GPU.
    counts = filled(filled(num_atoms, shape.crystals - real.crystals - 1, 0), 1, shape.atoms - real.atoms)
    return Layout(shape, counts, filled(batch, shape.atoms - real.atoms, shape.crystals - 1),
                  real=torch.arange(shape.crystals, device=device) < real.crystals,
                  real_atoms=torch.arange(shape.atoms, device=device) < real.atoms)


def atom_counts(num_atoms: torch.Tensor, batch: torch.Tensor, real_atoms: torch.Tensor | None = None) -> torch.Tensor:
    """(N,) the size of each atom's crystal; a padding atom counts as a one-atom crystal, which every per-size
    table holds (its crystal's own count, all the padding atoms, may be larger than the tables)."""
    counts = num_atoms[batch]
    return counts if real_atoms is None else torch.where(real_atoms, counts, 1)
