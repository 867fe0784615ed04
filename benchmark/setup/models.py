"""Floor 2: model definitions.

Models are plain ``nn.Sequential`` stacks of ``Conv2d``/``Linear``/activations so that curvature code
(K-FAC, per-sample gradients through ``torch.func``) sees every parameterised layer directly.
"""

from __future__ import annotations

from torch import nn


def simple_cnn(in_channels: int = 1, num_classes: int = 10, image_size: int = 28,
               channels: tuple[int, int] = (16, 32), hidden: int = 64) -> nn.Sequential:
    """The paper's "simple CNN": conv(1→16,5)-pool-conv(16→32,5)-pool-fc(512→64)-fc(64→10) at 28×28."""
    c1, c2 = channels
    side = ((image_size - 4) // 2 - 4) // 2
    if side < 1:
        raise ValueError(f"image_size {image_size} is too small for two 5x5 convolutions with pooling")
    return nn.Sequential(
        nn.Conv2d(in_channels, c1, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(c1, c2, 5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(c2 * side * side, hidden), nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )


def logistic_regression(in_features: int = 784, num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, num_classes))


def mlp(in_features: int = 784, hidden: int = 12, num_classes: int = 10) -> nn.Sequential:
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.Tanh(), nn.Linear(hidden, num_classes))


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
