"""MNIST with a small timm Vision Transformer, randomly initialised: the transformer family (patch embedding,
multi-head attention, MLP blocks, layer norm) on data every machine has, at a size where real ground truth is
affordable.

A fixed, seeded 10,000-image training subset (subset models train on 5,000); ViT at 28 x 28 with 7 x 7 patches
(16 tokens), width 64, depth 4, 4 heads, MLP ratio 2, average-pooled tokens, 1 input channel. Needs timm.
"""

from pathlib import Path

from benchmark.setup.config import DataSpec, Protocol, TrainRecipe
from benchmark.setup.data import load_idx_dataset
from benchmark.setup.plugins import load_plugin_file
from benchmark.setup.settings import Setting, fixed_subset, register
from benchmark.setup.vision import TimmModel

# The verified MNIST files are declared once, in mnist.py.
MNIST = load_plugin_file(Path(__file__).with_name("mnist.py"), "datasets").MNIST
TRAIN_SIZE, SUBSET_SEED = 10000, 2024
MODEL = TimmModel("vit_tiny_patch16_224", 10, options={
    "in_chans": 1, "img_size": 28, "patch_size": 7, "embed_dim": 64, "depth": 4, "num_heads": 4, "mlp_ratio": 2.0,
    "global_pool": "avg", "class_token": False})

register(Setting(
    name="mnist-vit",
    description=f"MNIST, fixed {TRAIN_SIZE:,}-example train subset, small timm ViT (patch 7, random init)",
    load_data=lambda: fixed_subset(load_idx_dataset(MNIST), TRAIN_SIZE, SUBSET_SEED),
    data_spec=DataSpec("mnist", {f.name: f.sha256 for f in MNIST.files}, TRAIN_SIZE, 10000,
                       {"fixed_subset_seed": SUBSET_SEED, "model": MODEL.record(), "pretrained": None}),
    build_model=MODEL,
    # A ViT trained from scratch by SGD needs many steps: on one 5,000-image subset, test accuracy was 79% after
    # 10 epochs and 89% after 20 (batch 32, lr 0.1); patch 4 (49 tokens) was slower and worse (50% at 10).
    recipe=TrainRecipe(epochs=20, batch_size=32, lr=0.1, momentum=0.9, weight_decay=5e-4),
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=4, queries=2000, validation_queries=500,
                                   full_models=4, seed_policy="shared")},
    requires=("timm",),
))
