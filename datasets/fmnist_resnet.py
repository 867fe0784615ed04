"""FashionMNIST with a small timm ResNet, randomly initialised: the ResNet family (convolutions, batch norm,
residual blocks) on data every machine has, at a size where real ground truth is affordable.

A fixed, seeded 10,000-image training subset (subset models train on 5,000), BasicBlock ResNet with one block
per stage, widths 16-32-64-128, 1 input channel (319,594 parameters). Needs timm (the ``vision`` extra).
"""

from pathlib import Path

from benchmark.setup.config import DataSpec, Protocol, TrainRecipe
from benchmark.setup.data import load_idx_dataset
from benchmark.setup.plugins import load_plugin_file
from benchmark.setup.settings import Setting, fixed_subset, register
from benchmark.setup.vision import TimmModel

# The verified FashionMNIST files are declared once, in fashion_mnist.py.
FASHION_MNIST = load_plugin_file(Path(__file__).with_name("fashion_mnist.py"), "datasets").FASHION_MNIST
TRAIN_SIZE, SUBSET_SEED = 10000, 2024
MODEL = TimmModel("resnet18", 10, options={"in_chans": 1, "layers": (1, 1, 1, 1), "channels": (16, 32, 64, 128),
                                           "stem_width": 16})

register(Setting(
    name="fmnist-resnet",
    description=f"FashionMNIST, fixed {TRAIN_SIZE:,}-example train subset, small timm ResNet (random init)",
    load_data=lambda: fixed_subset(load_idx_dataset(FASHION_MNIST), TRAIN_SIZE, SUBSET_SEED),
    data_spec=DataSpec("fashion-mnist", {f.name: f.sha256 for f in FASHION_MNIST.files}, TRAIN_SIZE, 10000,
                       {"fixed_subset_seed": SUBSET_SEED, "model": MODEL.record(), "pretrained": None}),
    build_model=MODEL,
    # On one 5,000-image subset: test accuracy 85.8% after 10 epochs (lr 0.05); 84.6% after 6 epochs at lr 0.1.
    recipe=TrainRecipe(epochs=10, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4),
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=4, queries=2000, validation_queries=500,
                                   full_models=4, seed_policy="shared")},
    requires=("timm",),
))
