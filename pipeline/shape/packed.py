"""Binary disc cubes held eight to a byte.

A training process keeps its discs in memory for hundreds of epochs; a 64³ cube as uint8 takes
256 KiB, packed 32 KiB. Cubes are packed as they are read (a batch at a time, so no unpacked copy
of the whole set ever exists) and unpacked a batch at a time as training draws them.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def _row_bytes(side: int) -> int:
    return -(-side**3 // 8)


class PackedCubes:
    """N binary cubes of side `side`, one packed row of side³ bits each."""

    def __init__(self, rows: np.ndarray, side: int):
        if rows.ndim != 2 or rows.dtype != np.uint8 or rows.shape[1] != _row_bytes(side):
            raise ValueError(f"packed rows of shape {rows.shape} ({rows.dtype}) do not hold "
                             f"cubes of side {side}")
        self.rows, self.side = rows, int(side)

    @classmethod
    def pack(cls, cubes: np.ndarray | torch.Tensor) -> PackedCubes:
        """From (N, S, S, S) cubes (any nonzero voxel is inside)."""
        array = cubes.cpu().numpy() if torch.is_tensor(cubes) else np.asarray(cubes)
        if array.ndim != 4 or len(set(array.shape[1:])) != 1:
            raise ValueError(f"expected (N, S, S, S) cubes, got shape {array.shape}")
        return cls(np.packbits(array.reshape(len(array), -1) > 0, axis=1), array.shape[1])

    @classmethod
    def concat(cls, parts: Sequence[PackedCubes]) -> PackedCubes:
        """One set from at least one part, all of one side."""
        return cls(np.concatenate([p.rows for p in parts]), parts[0].side)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def nbytes(self) -> int:
        return int(self.rows.nbytes)

    def take(self, index: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """The cubes at `index`, unpacked: (n, S, S, S) uint8 in {0, 1}."""
        index = index.numpy() if torch.is_tensor(index) else np.asarray(index)
        bits = np.unpackbits(self.rows[index], axis=1, count=self.side**3)
        return torch.from_numpy(bits.reshape(len(index), *(self.side,) * 3))


def packed(cubes: PackedCubes | np.ndarray | torch.Tensor) -> PackedCubes:
    return cubes if isinstance(cubes, PackedCubes) else PackedCubes.pack(cubes)
