"""FashionMNIST (Xiao, Rasul & Vollgraf 2017) with the paper's "simple CNN" (Table 1, row 2).

Files are the original gzipped IDX files, as installed by Debian's dataset-fashion-mnist.
"""

from benchmark.setup.config import DataSpec, Protocol, TrainRecipe
from benchmark.setup.data import DataFile, IdxDataset, load_idx_dataset
from benchmark.setup.models import simple_cnn
from benchmark.setup.settings import Setting, register

FASHION_MNIST = IdxDataset(
    name="fashion-mnist",
    files=(
        DataFile("train-images", "train-images-idx3-ubyte.gz", "b0564c3eedabfbf835052cff8503ea422014ce006caf5b757f851416ee8300c7"),
        DataFile("train-labels", "train-labels-idx1-ubyte.gz", "0ae29f65d86684f32d1b9c85147786c547b9c6aebcaf235f0400a0cce308b056"),
        DataFile("test-images", "t10k-images-idx3-ubyte.gz", "cc1d090a38ace84dfa1aa66e3ada7c336ef481a96936906477e6dd344da56eaa"),
        DataFile("test-labels", "t10k-labels-idx1-ubyte.gz", "8d3605d196f4be44669e46906da9733c8131fef761fdbfec72c424d5222f1a05"),
    ),
    num_classes=10,
    mean=0.2860,
    std=0.3530,
    system_dirs=("/usr/share/datasets/fashion-mnist",),
    torchvision_class="FashionMNIST",
    class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag",
                 "Ankle boot"),
)

register(Setting(
    name="fmnist-cnn",
    description="FashionMNIST, 60k train, simple CNN (Table 1, row 2)",
    load_data=lambda: load_idx_dataset(FASHION_MNIST),
    data_spec=DataSpec("fashion-mnist", {f.name: f.sha256 for f in FASHION_MNIST.files}, 60000, 10000),
    build_model=lambda: simple_cnn(1, 10, 28),
    recipe=TrainRecipe(epochs=8, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4),
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=4, queries=2000, validation_queries=500,
                                   full_models=4, seed_policy="shared")},
    paper_lds=0.47,
))
