"""tdabench: a benchmark for training-data attribution with influence functions.

The package is a house of floors, each importing only from the floors below it:
``core`` (math) → ``setup`` (configuration, data, models, training, files) → ``groundtruth`` (retrained
models and their artifacts) → ``evaluate`` (the Solver API, metrics, run records) → ``studies`` → ``report`` →
``cli``. Plugin files in ``solvers/`` and ``datasets/`` import from ``core``, ``setup`` and ``evaluate``.
"""

from .setup.plugins import install_finder as _install_finder

_install_finder()  # plugin modules (solvers/, datasets/) resolve by their stable names in every process
