"""Food-101 (Bossard, Guillaumin & Van Gool 2014) with ViT-B/16 fine-tuned from ImageNet-21k weights (Table 1, row 4).

The published split: 75,750 training and 25,250 test images (the Hugging Face copy calls the test split
``validation``). Prepared once at 224 px as the weights were trained (shorter side 248, centre crop, bicubic)
and cached as uint8 (15 GB). Weights: the original ViT-B/16, ImageNet-21k pre-trained and ImageNet-1k
fine-tuned (timm ``vit_base_patch16_224.orig_in21k_ft_in1k``, Google's ``vit-base-patch16-224``), with a new
101-way head seeded per model. Needs the ``vision`` extra, the data and the weights: see docs/large-settings.md.
"""

from benchmark.setup.config import DataSpec, Protocol, TrainRecipe
from benchmark.setup.settings import Setting, register
from benchmark.setup.vision import (INCEPTION_MEAN, INCEPTION_STD, HubImageDataset, ImageTransform, TimmModel,
                              load_hub_images)

FOOD101 = HubImageDataset(
    name="food101",
    repo="ethz/food101",
    train_splits=("train",),
    test_split="validation",
    num_classes=101,
    train_size=75750,
    test_size=25250,
)
TRANSFORM = ImageTransform(resize=248, crop=224, interpolation="bicubic", mean=INCEPTION_MEAN, std=INCEPTION_STD)
MODEL = TimmModel("vit_base_patch16_224", 101, pretrained="vit_base_patch16_224.orig_in21k_ft_in1k",
                  normalize=(TRANSFORM.mean, TRANSFORM.std))

register(Setting(
    name="food101-vitb16",
    description="Food-101, 75,750 train, ViT-B/16 fine-tuned from ImageNet-21k (Table 1, row 4)",
    load_data=lambda: load_hub_images(FOOD101, TRANSFORM),
    data_spec=DataSpec("food101", {}, FOOD101.train_size, FOOD101.test_size,
                       {"dataset": FOOD101.record(), "transform": TRANSFORM.record(), "model": MODEL.record(),
                        "pretrained": MODEL.pretrained}),
    build_model=MODEL,
    # One epoch of a 37,875-image subset at batch 64 is 592 SGD steps; no weight decay, as ViT fine-tuning does.
    recipe=TrainRecipe(epochs=1, batch_size=64, lr=0.003, momentum=0.9, weight_decay=0.0),
    # Two seed replicas: a subset model costs minutes of GPU time (docs/large-settings.md); extend with --seeds.
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=2, queries=2000, validation_queries=500,
                                   full_models=2, seed_policy="shared")},
    paper_lds=0.43,
    trainer="loop",  # one model at a time: vmap would stack 400 copies of the network and its activations
    requires=("timm", "datasets"),
))
