"""Train the shipped digits classifier (models/pretrained/digits_classifier.pt), the feature extractor of
``evaluation.classifier``: a small convolutional net on clean data=digits (t = 0 only), seeded.

    python scripts/train_digits_classifier.py                      # rewrites the shipped file
    python scripts/train_digits_classifier.py --out /tmp/clf.pt    # anywhere else

It trains on digits' training split (data_range (0, 1), test_fraction 0.2, split seed 0: what ``data=digits``
loads with seed=0), measures the accuracy on the 359 held-out images and records it in the file
(``info["test_accuracy"]``). About a minute on one CPU core.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from data_lib import load_dataset  # noqa: E402
from evaluation.classifier import DIGITS_CLASSIFIER, class_accuracy  # noqa: E402
from models import NoiseClassifier, build_classifier, save_classifier  # noqa: E402
from sde_lib import VPSDE  # noqa: E402
from tasks_lib.classifier import fit_classifier  # noqa: E402

#: The network and its training; the shipped file was made with exactly these.
NET = {"base_channels": 16, "channel_mults": (1, 2), "embedding": None}
STEPS, BATCH_SIZE, LR, EMA_DECAY = 1500, 128, 3e-3, 0.995


def train(seed: int = 0, steps: int = STEPS) -> NoiseClassifier:
    """The digits classifier trained with ``seed`` (initialisation and batches), its test accuracy in ``info``."""
    torch.set_num_threads(1)
    data = load_dataset("digits", seed=0)   # the split of data=digits with seed=0
    torch.manual_seed(seed)
    net = build_classifier("conv", data.event_shape, len(data.classes), **NET)
    # At t = 0 a VP SDE's x_t is x₀: the classifier's input is x₀/σ_data.
    classifier = NoiseClassifier(net, VPSDE(), sigma_data=round(data.train_std(), 6), classes=data.classes)
    trained = fit_classifier(classifier, data, steps, BATCH_SIZE, LR, EMA_DECAY, seed, torch.device("cpu"),
                             noisy=False)
    trained.info = {"data": "digits", "data_range": list(data.data_range), "t": 0.0, "seed": seed, "steps": steps,
                    "script": "scripts/train_digits_classifier.py", "n_test": len(data.test)}
    trained.info["test_accuracy"] = class_accuracy(trained, data.test_points(), data.test_labels)
    return trained


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DIGITS_CLASSIFIER, help="where to write the classifier (.pt)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=STEPS)
    args = parser.parse_args(argv)
    start = time.perf_counter()
    classifier = train(args.seed, args.steps)
    save_classifier(args.out, classifier)
    n_params = sum(p.numel() for p in classifier.parameters())
    print(f"test accuracy {classifier.info['test_accuracy']:.4f} on {classifier.info['n_test']} held-out digits, "
          f"{n_params} parameters, {time.perf_counter() - start:.0f} s; written to {args.out} "
          f"({args.out.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
