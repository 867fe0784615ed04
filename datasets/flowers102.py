"""Oxford Flowers102 (Nilsback & Zisserman 2008) with ResNet-50 fine-tuned from ImageNet weights (Table 1, row 3).

The published split: the 1,020 train and 1,020 validation images (10 per class) are the training set, the
6,149 test images give the queries. Data: the Hugging Face copy of that split, prepared once at 224 px the way
the weights were trained (shorter side 256, centre crop, bilinear) and cached. Weights: torchvision's ImageNet
ResNet-50 (timm ``resnet50.tv_in1k``), with a new 102-way head seeded per model. Needs the ``vision`` extra,
the data and the weights: see docs/large-settings.md.
"""

from benchmark.setup.config import DataSpec, Protocol, TrainRecipe
from benchmark.setup.settings import Setting, register
from benchmark.setup.vision import IMAGENET_MEAN, IMAGENET_STD, HubImageDataset, ImageTransform, TimmModel, load_hub_images

FLOWERS102 = HubImageDataset(
    name="flowers102",
    repo="dpdl-benchmark/oxford_flowers102",
    train_splits=("train", "validation"),
    test_split="test",
    num_classes=102,
    train_size=2040,
    test_size=6149,
)
TRANSFORM = ImageTransform(resize=256, crop=224, interpolation="bilinear", mean=IMAGENET_MEAN, std=IMAGENET_STD)
MODEL = TimmModel("resnet50", 102, pretrained="resnet50.tv_in1k", normalize=(TRANSFORM.mean, TRANSFORM.std))

register(Setting(
    name="flowers102-resnet50",
    description="Flowers102, 2,040 train (train+val), ResNet-50 fine-tuned from ImageNet (Table 1, row 3)",
    load_data=lambda: load_hub_images(FLOWERS102, TRANSFORM),
    # The weights a model starts from are part of what it is: recorded here so that artifacts built from
    # different starting points can never be mixed (the recipe hash differs).
    data_spec=DataSpec("flowers102", {}, FLOWERS102.train_size, FLOWERS102.test_size,
                       {"dataset": FLOWERS102.record(), "transform": TRANSFORM.record(), "model": MODEL.record(),
                        "pretrained": MODEL.pretrained}),
    build_model=MODEL,
    # Fine-tuning: 10 epochs of 1,020 images (a subset model) at batch 32 is 320 SGD steps.
    recipe=TrainRecipe(epochs=10, batch_size=32, lr=0.01, momentum=0.9, weight_decay=1e-4),
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=4, queries=2000, validation_queries=500,
                                   full_models=4, seed_policy="shared")},
    paper_lds=0.46,
    trainer="loop",  # one model at a time: vmap would stack 400 copies of the network and its activations
    requires=("timm", "datasets"),
))
