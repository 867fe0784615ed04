"""traker: TRAK (Park et al. 2023) through its authors' library ``traker`` (MadryLab, v0.3.2) — a peer
implementation on our task, explained model and ground truth.

TRAK projects per-example gradients of the margin f(z) = log(p/(1 − p)) (our margin) to ``proj_dim`` dimensions
with a random Gaussian matrix, Φ (N × k) for the training set, and scores τ_TRAK(q, i) = φ(q)ᵀ(ΦᵀΦ)⁻¹φ(zᵢ)·(1 − pᵢ)
(the paper's one-model estimator; ensembles are the evaluation's ``ensemble=n``, averaging scores over models).
The adapter runs traker's own pipeline (``featurize``, ``finalize_features``, ``score``, ``finalize_scores``) and
maps its conventions onto ours:

- *Sign*: positive = up-weighting zᵢ raises the query's margin, as ours.
- *Scale*: TRAK's kernel ΦᵀΦ sums over the training set (the Hessian of the *summed* loss in its derivation);
  ours is the curvature of the *mean* loss, so τ = N · τ_TRAK. traker also divides (ΦᵀΦ)⁻¹ by the mean absolute
  value of its entries, an arbitrary positive scale the adapter multiplies back (LDS and rankings see neither).
- *Measurement*: the margin only (traker's image-classification output); a task on the loss is refused.
- *Projection*: traker's CPU projector (``BasicProjector``, Gaussian), seeded with the task's seed, generated once
  as one block (traker's default regenerates it in blocks of 100 columns for every batch, which makes featurizing
  60,000 examples take the better part of an hour on two cores); float32 features (traker's half precision needs
  a GPU). ``lambda_reg`` is traker's ridge on ΦᵀΦ (0, its default).

Not provided by traker, so refused clearly: an IHVP of arbitrary vectors (no IHVP-error row) and self-influence
(no mislabel row). Scores are for the training set the solver was fitted on (the kernel is that set's).
Needs ``pip install 'tdabench[peers]'``; without it the row is listed as unavailable.
"""

from __future__ import annotations

import logging
import tempfile

import torch

from benchmark import core
from benchmark.evaluate import Solver, SolverError

VERSION = "0.3.2"  # the version this adapter was checked against (pyproject's peers extra pins it)


class TRAKer(Solver):
    name = "traker"
    description = f"TRAK through MadryLab's traker {VERSION}: projected margin gradients, (ΦᵀΦ)⁻¹ kernel (peer)"
    requires = ("trak",)
    has_self_influence = False
    parameters = {}
    defaults = {"proj_dim": 2048, "lambda_reg": 0.0, "batch_size": 256}

    @classmethod
    def probe_params(cls, params):
        # 2,048 projections of 48 probe examples without a ridge: a singular kernel that round-off decides; 16 < 48
        # keeps it invertible
        return {**params, "proj_dim": min(int(params.get("proj_dim", 2048)), 16)}

    def fit(self, task):
        super().fit(task)
        from trak import TRAKer as Traker
        from trak.projectors import BasicProjector, ProjectionType

        if task.measurement != "margin":
            raise SolverError(f"{self.name}: traker attributes the margin (its image-classification output); this "
                              f"task's measurement is {task.measurement!r}")
        k, bs = int(self.params["proj_dim"]), int(self.params["batch_size"])
        if k < 1 or bs < 1:
            raise SolverError(f"{self.name}: proj_dim and batch_size must be positive, got {k} and {bs}")
        grad_dim = self.feature_dim()
        device = str(task.device)
        self.folder = tempfile.TemporaryDirectory(prefix="tdabench-traker-")  # removed with the solver
        model = _float32_copy(task.model)
        projector = BasicProjector(grad_dim=grad_dim, proj_dim=k, seed=task.seed, proj_type=ProjectionType.normal,
                                   device=device, block_size=k, dtype=torch.float32)
        self.traker = Traker(model=model, task="image_classification", train_set_size=len(task.train_y),
                             save_dir=self.folder.name, device=device, projector=projector,
                             use_half_precision=False, grad_wrt=self.attributed,
                             lambda_reg=float(self.params["lambda_reg"]), logging_level=logging.WARNING)
        self.traker.load_checkpoint(model.state_dict(), model_id=0)
        for sl in core.chunks(len(task.train_y), bs, desc=f"TRAK features ({self.name})"):
            self.traker.featurize(batch=self._batch(task.train_x[sl], task.train_y[sl]), num_samples=sl.stop - sl.start)
        self.traker.finalize_features()
        if not projector.proj_matrix_available:  # traker 0.3.2 frees a one-block matrix here and never regenerates it
            projector.generate_sketch_matrix(projector.generator_states[0])  # (same seed: the same matrix)
        self.kernel_scale = self._kernel_scale()
        self.model = model
        self.version = _version()
        self._experiments = 0
        return self

    def _kernel_scale(self) -> float:
        """traker divides (ΦᵀΦ + λI)⁻¹ by the mean absolute value of its entries (for float16 safety), which gives its
        scores an arbitrary positive scale; that mean, from its stored projected gradients, undoes it."""
        phi = torch.as_tensor(self.traker.saver.current_store["grads"], dtype=torch.float32)
        xtx = phi.T @ phi + self.params["lambda_reg"] * torch.eye(phi.shape[1])
        return float(torch.linalg.inv(xtx).abs().mean())

    def _batch(self, x, y):
        return [x.to(self.task.device, torch.float32) if x.is_floating_point() else x.to(self.task.device),
                y.to(self.task.device)]

    def scores(self, query_x, query_y, train_x, train_y, *, query_chunk=None, train_chunk=None):
        task = self._require_fit()
        if train_x.is_floating_point():
            core.check_finite(train_x, "train loss gradient", 0)  # a NaN/Inf input has a NaN/Inf gradient
        if query_x.is_floating_point():
            core.check_finite(query_x, "query gradient (margin)", 0)
        if train_x is not task.train_x and not (train_x.shape == task.train_x.shape and torch.equal(
                train_x.cpu(), task.train_x.cpu()) and torch.equal(train_y.cpu(), task.train_y.cpu())):
            raise SolverError(f"{self.name}: TRAK's kernel belongs to the training set it was fitted on; score that "
                              f"set (fit again to score another)")
        qc = query_chunk or self.params["batch_size"]
        name = f"q{self._experiments}"
        self._experiments += 1
        self.traker.start_scoring_checkpoint(exp_name=name, checkpoint=self.model.state_dict(), model_id=0,
                                             num_targets=len(query_y))
        for sl in core.chunks(len(query_y), qc):
            self.traker.score(batch=self._batch(query_x[sl], query_y[sl]), num_samples=sl.stop - sl.start)
        out = torch.as_tensor(self.traker.finalize_scores(exp_name=name)).float()  # (N, Q)
        scores = (len(train_y) * self.kernel_scale * out.T).contiguous()  # our scale: the mean loss's curvature
        core.check_finite(scores, f"score ({self.name})", None)
        return scores

    def self_scores(self, train_x, train_y, *, train_chunk=None):
        raise SolverError(f"{self.name}: traker computes no self-influence (no mislabel-detection row); use a "
                          f"solver with an IHVP, e.g. ekfac")

    def info(self):
        return {**super().info(), "library": "traker", "library_version": getattr(self, "version", None),
                "proj_dim": self.params["proj_dim"], "projector": "BasicProjector (normal, one block)",
                "scale": f"N x {self.kernel_scale:.6g} (traker's kernel normalisation) x traker score"
                if hasattr(self, "kernel_scale") else None}


def _float32_copy(model):
    import copy

    return copy.deepcopy(model).float().eval()


def _version():
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("traker")
    except PackageNotFoundError:
        return None
