"""kronfluence-*: the Kronfluence library (Grosse et al. 2023's implementation, v1.0.1) as solvers — a peer
implementation on our task, explained model and ground truth, so the leaderboard compares implementations too.

One row per Kronfluence strategy, because each is another method (as our kfac and ekfac are two rows):
``kronfluence-identity`` (gradient dot product), ``kronfluence-diagonal`` (diagonal of the sampled Fisher),
``kronfluence-kfac`` and ``kronfluence-ekfac``. Kronfluence fits its factors, preconditions and scores through its
own public API (``Analyzer.fit_all_factors``, ``compute_pairwise_scores``, ``compute_self_scores``); the adapter
only maps our conventions onto it:

- *Curvature*: the true Fisher with labels sampled from the model (``use_empirical_fisher=False``, our
  ``pseudo_labels="sampled"``) over the whole training set (``covariance_max_examples`` and
  ``lambda_max_examples`` = all), the training loss summed per batch as Kronfluence expects; its factors are means
  over examples, i.e. curvature of the *mean* loss, so our absolute λ is its ``damping_factor`` unchanged.
  (Kronfluence's K-FAC output-gradient factor of a convolution averages over spatial positions where ours sums
  them, so on convolutions its K-FAC eigenvalues are ours / positions and λ weighs more; EK-FAC refits the
  eigenvalues from per-example gradients, where the two agree.)
- *Sign*: Kronfluence scores ∇m ᵀ(G + λI)⁻¹∇L(zᵢ) for a measurement m; with m = −f (minus our margin or loss,
  as Kronfluence's own examples do) that is our τ(q, i) = −∇fᵀ(G + λI)⁻¹∇L(zᵢ), positive = up-weighting i helps f.
- *Parameters*: the nn.Linear / nn.Conv2d layers we attribute through (``last_blocks``, ``kron_layers``), passed
  as Kronfluence's tracked modules; everything else is held constant, and ``info()`` records it.
- *Precision*: Kronfluence's dtypes follow the model's (its defaults for a float32 model), eigendecompositions in
  float64 (its default).

``ihvp`` applies Kronfluence's own preconditioner (``FactorConfig.prepare`` / ``precondition_gradient``) to our
flat vectors, for the IHVP-error study and the contract tests; scores and self-influence never go through it.
Needs ``pip install 'tdabench[peers]'``; without it the rows are listed as unavailable.
"""

from __future__ import annotations

import copy
import os
import shutil
import tempfile

import torch
import torch.nn.functional as F

from benchmark import core
from benchmark.evaluate import DAMPING_GRID, Solver

VERSION = "1.0.1"  # the version these adapters were checked against (pyproject's peers extra pins it)
FIT_BATCH = 512  # examples per batch when fitting factors (our K-FAC uses the same)


def _kronfluence_task(layer_paths: list[str], measurement: str):
    """A kronfluence.task.Task for classification with our measurement f, scored as m = −f."""
    from kronfluence.task import Task as KTask

    measure = core.MEASUREMENTS[measurement]

    class Classification(KTask):
        def compute_train_loss(self, batch, model, sample=False):
            x, y = batch
            logits = model(x)
            if sample:  # the true Fisher: labels drawn from the model's predictive distribution
                with torch.no_grad():
                    y = torch.multinomial(torch.softmax(logits.detach(), dim=-1), 1).flatten()
            return F.cross_entropy(logits, y, reduction="sum")

        def compute_measurement(self, batch, model):
            x, y = batch
            return -measure(model(x), y).sum()

        def get_influence_tracked_modules(self):
            return list(layer_paths)

    return Classification()


class _Kronfluence(Solver):
    """The shared adapter; each subclass names one Kronfluence strategy."""

    strategy = ""
    requires = ("kronfluence",)
    parameters = {"damping": DAMPING_GRID}
    defaults = {"damping": 1e-3, "unsupported_layers": "exclude"}

    def fit(self, task):
        super().fit(task)
        import kronfluence
        from kronfluence.analyzer import Analyzer, prepare_model
        from kronfluence.arguments import FactorArguments

        self.layers = self.kron_layers(self.params["unsupported_layers"])
        paths = [layer.path for layer in self.layers]
        dtype = core.FunctionalModel(task.model).dtype
        self.dtype = dtype
        self.version = kronfluence.__version__
        self.factor_args = FactorArguments(
            strategy=self.strategy, use_empirical_fisher=False, covariance_max_examples=None,
            lambda_max_examples=None, activation_covariance_dtype=dtype, gradient_covariance_dtype=dtype,
            per_sample_gradient_dtype=dtype, lambda_dtype=dtype)

        def build():
            folder = tempfile.TemporaryDirectory(prefix="tdabench-kronfluence-")  # removed when the cache drops it
            ktask = _kronfluence_task(paths, task.measurement)
            model = prepare_model(copy.deepcopy(task.model).eval(), ktask)  # wraps layers in place: a copy
            analyzer = Analyzer(analysis_name="tdabench", model=model, task=ktask, cpu=task.device.type == "cpu",
                                output_dir=folder.name, disable_model_save=True,
                                disable_tqdm=os.environ.get("TDABENCH_PROGRESS", "1") == "0")  # as our bars
            with torch.random.fork_rng(devices=[task.device] if task.device.type == "cuda" else []):
                torch.manual_seed(task.seed)  # the sampled labels
                analyzer.fit_all_factors("factors", _dataset(task.train_x, task.train_y),
                                         per_device_batch_size=FIT_BATCH, factor_args=self.factor_args,
                                         overwrite_output_dir=True)
            return {"folder": folder, "analyzer": analyzer, "task": ktask}

        # (the factors do not depend on the measurement; the analyzer's task, which scores it, does)
        self.fitted = self.cached(f"kronfluence-{self.strategy}", build, layers=tuple(paths), batch=FIT_BATCH,
                                  dtype=str(dtype), measurement=task.measurement)
        self.layout = self.functional().layout
        self._preconditioner = None
        return self

    # -- Kronfluence's own scoring -------------------------------------------------------------
    def _score_args(self):
        from kronfluence.arguments import ScoreArguments

        lam = self.params.get("damping", 0.0)
        return ScoreArguments(damping_factor=lam, per_sample_gradient_dtype=self.dtype,
                              precondition_dtype=self.dtype, score_dtype=self.dtype)

    def _analyzer(self):
        self._require_fit()
        return self.fitted["analyzer"]

    def scores(self, query_x, query_y, train_x, train_y, *, query_chunk=None, train_chunk=None):
        analyzer = self._analyzer()
        _check_inputs(train_x, "train loss gradient")
        _check_inputs(query_x, f"query gradient ({self.task.measurement})")
        qc, tc = self.chunk_sizes(query_chunk, train_chunk)
        analyzer.compute_pairwise_scores(
            "pairwise", "factors", _dataset(query_x, query_y), _dataset(train_x, train_y),
            per_device_query_batch_size=min(qc, len(query_y)), per_device_train_batch_size=min(tc, len(train_y)),
            score_args=self._score_args(), overwrite_output_dir=True)
        return self._load(analyzer, "pairwise", analyzer.load_pairwise_scores, "score")

    def self_scores(self, train_x, train_y, *, train_chunk=None):
        analyzer = self._analyzer()
        _check_inputs(train_x, "train loss gradient")
        _, tc = self.chunk_sizes(None, train_chunk)
        analyzer.compute_self_scores("self", "factors", _dataset(train_x, train_y),
                                     per_device_train_batch_size=min(tc, len(train_y)),
                                     score_args=self._score_args(), overwrite_output_dir=True)
        return self._load(analyzer, "self", analyzer.load_self_scores, "self-influence score")

    def _load(self, analyzer, name, load, what):
        """Kronfluence writes scores to its output folder: read them back, then free the disk."""
        scores = load(name)["all_modules"].float().cpu()
        shutil.rmtree(analyzer.scores_output_dir(name), ignore_errors=True)
        core.check_finite(scores, f"{what} ({self.name})", None)
        return scores

    # -- Kronfluence's preconditioner on our vectors -------------------------------------------
    def ihvp(self, vectors):
        from kronfluence.factor.config import FactorConfig

        analyzer = self._analyzer()
        config = FactorConfig.CONFIGS[self.strategy]
        if self._preconditioner is None:
            loaded = analyzer.load_all_factors("factors")
            storage = {}
            for layer in self.layers:
                store = {name: per_module[layer.path] for name, per_module in loaded.items()}
                config.prepare(store, self._score_args(), vectors.device)
                storage[layer.path] = store
            self._preconditioner = storage
        flat = self.layout.unflatten(vectors.to(self.dtype))
        out = {}
        for layer in self.layers:
            grad = layer.to_matrix(flat)  # (B, out, in[+1]): Kronfluence's layout, bias in the last column
            out.update(layer.from_matrix(config.precondition_gradient(grad, self._preconditioner[layer.path])))
        return self.layout.flatten(out, batch_dims=1).to(vectors.dtype)

    def info(self):
        return {**super().info(), "library": "kronfluence", "library_version": getattr(self, "version", None),
                "strategy": self.strategy, "layers": [layer.path for layer in getattr(self, "layers", [])],
                "factor_args": self.factor_args.to_str_dict() if hasattr(self, "factor_args") else None}


def _dataset(x, y):
    return torch.utils.data.TensorDataset(x, y)


def _check_inputs(x, label):
    """Kronfluence scores NaN/Inf inputs without a word; refuse them up front, naming the example (a non-finite
    input has a non-finite gradient)."""
    if x.is_floating_point():
        core.check_finite(x, label, 0)


class KronfluenceIdentity(_Kronfluence):
    name = "kronfluence-identity"
    description = f"Kronfluence {VERSION}, strategy identity: gradient dot product (peer implementation)"
    strategy = "identity"
    parameters = {}
    defaults = {"unsupported_layers": "exclude"}


class KronfluenceDiagonal(_Kronfluence):
    name = "kronfluence-diagonal"
    description = f"Kronfluence {VERSION}, strategy diagonal: diagonal of the sampled Fisher (peer implementation)"
    strategy = "diagonal"


class KronfluenceKFAC(_Kronfluence):
    name = "kronfluence-kfac"
    description = f"Kronfluence {VERSION}, strategy kfac (peer implementation of K-FAC)"
    strategy = "kfac"


class KronfluenceEKFAC(_Kronfluence):
    name = "kronfluence-ekfac"
    description = f"Kronfluence {VERSION}, strategy ekfac (peer implementation of EK-FAC)"
    strategy = "ekfac"
