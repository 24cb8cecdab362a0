"""Seeded index splits of in-memory data, shared by the image and the text bundles
(:mod:`sglp_edge.data.datasets`, :mod:`sglp_edge.data.text`): a seeded permutation, images held as a uint8
tensor, and a view of some indices of a data set with a transform applied."""

from __future__ import annotations

from typing import Callable, Sequence

import torch
from torch.utils.data import Dataset


def seeded_perm(n: int, seed: int) -> list[int]:
    """A permutation of ``range(n)`` that depends only on ``seed``."""
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g).tolist()


class TensorImages(Dataset):
    """Images held in memory as a uint8 tensor (N, C, H, W) plus int64 labels."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.dim() == 4, images.shape
        self.images, self.labels = images, labels.long()

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.images[i], int(self.labels[i])


class Split(Dataset):
    """``indices`` of ``source`` with a transform applied to each image."""

    def __init__(self, source: Dataset, indices: Sequence[int], transform: Callable | None):
        self.source, self.indices, self.transform = source, list(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        img, label = self.source[self.indices[i]]
        if self.transform is not None:
            img = self.transform(img)
        return img, int(label)

    def with_transform(self, transform: Callable | None) -> "Split":
        return Split(self.source, self.indices, transform)
