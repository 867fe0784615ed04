"""A tiny synthetic image dataset for tests: class prototypes plus Gaussian noise, fully seeded.

No files, no network; small enough that every test trains its models in well under a second.
"""

import numpy as np
import torch

from benchmark.setup.config import DataSpec, Protocol, TrainRecipe
from benchmark.setup.data import ImageData
from benchmark.setup.models import mlp, simple_cnn
from benchmark.setup.settings import Setting, register

SIDE, CLASSES, N_TRAIN, N_TEST, NOISE, SEED = 16, 4, 256, 128, 1.0, 7


def make_synthetic(side: int = SIDE, classes: int = CLASSES, n_train: int = N_TRAIN, n_test: int = N_TEST,
                   noise: float = NOISE, seed: int = SEED) -> ImageData:
    rng = np.random.default_rng(seed)
    prototypes = rng.normal(size=(classes, 1, side, side)).astype(np.float32)

    def draw(n):
        y = rng.integers(0, classes, size=n)
        x = prototypes[y] + noise * rng.normal(size=(n, 1, side, side)).astype(np.float32)
        return torch.from_numpy(x), torch.from_numpy(y.astype(np.int64))

    train_x, train_y = draw(n_train)
    test_x, test_y = draw(n_test)
    return ImageData(train_x, train_y, test_x, test_y, classes, tuple(f"class{c}" for c in range(classes)))


SPEC = DataSpec("synthetic", {}, N_TRAIN, N_TEST,
                {"side": SIDE, "classes": CLASSES, "noise": NOISE, "seed": SEED})
TINY_PROTOCOL = Protocol(alpha=0.5, subsets=8, seeds=2, queries=16, validation_queries=8, full_models=2,
                         seed_policy="shared")

register(Setting(
    name="synthetic-mlp",
    description="synthetic 16x16 prototypes + noise, 4 classes, MLP 256-8-4 (tests)",
    load_data=make_synthetic,
    data_spec=SPEC,
    build_model=lambda: mlp(SIDE * SIDE, 8, CLASSES),
    recipe=TrainRecipe(epochs=3, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3),
    protocols={"default": TINY_PROTOCOL},
))

register(Setting(
    name="synthetic-cnn",
    description="synthetic 16x16 prototypes + noise, 4 classes, tiny CNN (tests)",
    load_data=make_synthetic,
    data_spec=SPEC,
    build_model=lambda: simple_cnn(1, CLASSES, SIDE, channels=(4, 8), hidden=16),
    recipe=TrainRecipe(epochs=6, batch_size=32, lr=0.05, momentum=0.9, weight_decay=1e-3),
    protocols={"default": TINY_PROTOCOL},
))
