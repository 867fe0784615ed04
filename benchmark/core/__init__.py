"""Floor 1 — the math every solver shares: pure torch, no files, no settings.

A solver file needs only this and :mod:`benchmark.evaluate`::

    from benchmark import core
    from benchmark.evaluate import DAMPING_GRID, Solver

- :mod:`.params`: the flat parameter layout and the model as pure functions (``FunctionalModel``);
- :mod:`.measurements`: the query functions f (margin, loss);
- :mod:`.products`: per-example gradients, Gauss-Newton / Hessian products, dense matrices for small models;
- :mod:`.kronecker`: K-FAC / EK-FAC factors, eigenbases and their damped inverse;
- :mod:`.lanczos`: the top of an operator's spectrum (Lanczos with full reorthogonalisation, for Arnoldi);
- :mod:`.projection`: a seeded Gaussian random projection applied in blocks, and projected gradient Gram matrices
  (TRAK);
- :mod:`.unroll`: differentiating through training (SOURCE's segment functions, the exact SGD adjoint);
- :mod:`.cache`: the content-keyed cache of damping-independent curvature, owned by a run;
- :mod:`.stats`: rank statistics and the ground truth's noise ceiling.
"""

from .cache import CurvatureCache, fingerprint
from .errors import SolverError
from .kronecker import (DAMPING_MODES, NORM_LAYERS, PSEUDO_LABELS, UNSUPPORTED_LAYERS, KronLayer, damped_eigenvalues,
                        eigenbasis, ekfac_eigenvalues, kron_apply, kron_layers, kron_layers_and_exclusions,
                        kron_partition, kronecker_eigenbases, kronecker_factors, layer_pseudo_grads,
                        pseudo_label_cotangents)
from .lanczos import lanczos
from .measurements import MEASUREMENTS, loss, margin
from .params import (FunctionalModel, ParamLayout, as_dtype, check_finite, chunks, last_blocks_parameters,
                     model_blocks)
from .projection import RandomProjection, projected_gram
from .products import (curvature_vector_product, dense_curvature, dense_ggn, dense_hessian, ggn_vector_product,
                       hessian_vector_product, logit_hessian, logit_hessian_factor, loss_gradient_sum,
                       per_sample_grads, singular_tolerance, top_eigenvalue)
from .unroll import segment_bounds, segment_scales, segment_times, unrolled_scores
