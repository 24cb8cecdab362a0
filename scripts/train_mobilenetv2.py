"""Train the shipped small MobileNetV2 on Fashion-MNIST (Debian dataset-fashion-mnist) with the
project's own trainer (sglp_edge.train.fit) and write it as the asset sglp_edge/assets/mobilenetv2_fmnist
(model.safetensors + sglp_model.json + manifest.json with the recipe, the accuracies and the
weights' sha256), the way the ResNet-56 asset ships.

    flock /work/heavy.lock python scripts/train_mobilenetv2.py [--epochs 4] [--threads 2] [--out DIR]

Single-channel input (the grey images, zero-padded 28 -> 32); 5,000 training images held out
(seeded) for model selection; the official 10,000-image test split is the held-out accuracy.
Resumable: a killed run restarts from OUT.state.pt.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

OUT = Path(__file__).resolve().parents[1] / "sglp_edge" / "assets" / "mobilenetv2_fmnist"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=float, default=4.0)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=0.1)
    ap.add_argument("--weight-decay", type=float, default=4e-5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, default=OUT)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)

    import torch

    from sglp_edge.commands.train import write_trained_checkpoint
    from sglp_edge.data.datasets import get_dataset
    from sglp_edge.models.mobilenet_small import SmallMobileNetV2Adapter, mobilenetv2_fmnist
    from sglp_edge.train.config import LoopConfig
    from sglp_edge.train.fit import BASELINE_RECIPE, train_classifier, training_manifest

    bundle = get_dataset("fashion-mnist", seed=args.seed, channels=1)
    torch.manual_seed(args.seed)  # the initial weights depend on the seed only
    net = mobilenetv2_fmnist(num_classes=bundle.num_classes, in_channels=1)
    recipe = {**BASELINE_RECIPE, "batch_size": args.batch_size, "lr": args.lr, "weight_decay": args.weight_decay}
    cfg = LoopConfig(epochs=args.epochs, seed=args.seed, threads=args.threads, **recipe)
    cfg.check()
    state = args.out.with_name(args.out.name + ".state.pt")
    t0 = time.time()
    res = train_classifier(net, bundle, cfg, state_path=state, progress=not args.no_progress,
                           desc="train mobilenetv2_fmnist")
    cmd = "python scripts/train_mobilenetv2.py" + "".join(
        f" --{k.replace('_', '-')} {v}" for k, v in vars(args).items()
        if k not in ("out", "no_progress") and v != ap.get_default(k))
    manifest = training_manifest("mobilenetv2_fmnist", bundle, args.seed, res, t0, cmd)
    write_trained_checkpoint(res.model, SmallMobileNetV2Adapter(), args.out, manifest)
    state.unlink(missing_ok=True)
    test = "n/a" if res.test_acc is None else f"{res.test_acc:.2%}"
    print(f"wrote {args.out}: val top-1 {res.val_acc:.2%}, held-out test top-1 {test} ({res.fit.selected}); "
          f"{manifest['train_minutes']} min of training (noisy: shared cores)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
