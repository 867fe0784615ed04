"""Floor 2: a Setting bundles data, model, training recipe and measurement.

Settings are declared in ``datasets/*.py`` files with :func:`register`; :func:`get` and
:func:`available` discover them. ``get("mnist-cnn@epochs=3")`` returns a *derived* setting: the same data
and model with other training-recipe values, for studies (it never appears on the leaderboard, and its own
recipe hash keeps its ground truths apart). A setting's *recipe hash* covers everything that determines what a
trained model is (data identity, architecture, optimiser recipe, training-code version), so a ground
truth built under another recipe is detected as stale.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from .config import TRAINING_CODE_VERSION, DataSpec, Protocol, TrainRecipe, stable_hash
from .data import ImageData
from ..core.measurements import MEASUREMENTS
from .models import num_params


@dataclass(frozen=True)
class Setting:
    name: str
    description: str
    load_data: Callable[[], ImageData]
    data_spec: DataSpec
    build_model: Callable[[], nn.Module]
    recipe: TrainRecipe
    protocols: dict = field(default_factory=lambda: {"default": Protocol()})
    measurement: str = "margin"
    paper_lds: float | None = None
    # Settings whose data or weights cannot be had everywhere say so instead of failing obscurely.
    requires: tuple[str, ...] = ()
    # Ground-truth trainer when the user says "auto": None = calibrate loop vs vmap by timing; "loop" for models
    # too large to stack (calibrating vmap over many ResNet-50s would itself exhaust memory).
    trainer: str | None = None

    def __post_init__(self):
        if self.measurement not in MEASUREMENTS:
            raise ValueError(f"unknown measurement {self.measurement!r}; choose from {sorted(MEASUREMENTS)}")
        if "default" not in self.protocols:
            raise ValueError(f"setting {self.name}: protocols must include 'default'")
        if self.trainer not in (None, "loop", "vmap"):
            raise ValueError(f"setting {self.name}: trainer must be None, 'loop' or 'vmap', got {self.trainer!r}")

    def data(self) -> ImageData:
        """The setting's data, loaded once per process."""
        if self.name not in _DATA_CACHE:
            _DATA_CACHE[self.name] = self.load_data()
        return _DATA_CACHE[self.name]

    def model(self, seed: int) -> nn.Module:
        """A freshly initialised model; the initialisation depends only on ``seed``."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.build_model()

    def model_spec(self) -> dict:
        m = self.model(0)
        return {"architecture": repr(m), "parameters": num_params(m)}

    def recipe_record(self) -> dict:
        return {
            "data": self.data_spec.to_dict(),
            "model": self.model_spec(),
            "train": self.recipe.to_dict(),
            "training_code_version": TRAINING_CODE_VERSION,
        }

    def recipe_hash(self) -> str:
        return stable_hash(self.recipe_record())

    def __reduce__(self):
        # Settings hold functions of their dataset file (lambdas); a worker process gets the same setting by
        # name from its own registry, checked to have the same recipe.
        return _resolve, (self.name, self.recipe_hash())

    def derive(self, **recipe_overrides) -> "Setting":
        """This setting trained with other recipe values, named ``name@k=v,...`` (keys sorted): a study setting."""
        fields = [f.name for f in dataclasses.fields(TrainRecipe)]
        unknown = sorted(set(recipe_overrides) - set(fields))
        if unknown or not recipe_overrides:
            raise ValueError(f"a derived setting changes training-recipe fields ({', '.join(fields)}); got "
                             f"{unknown or 'none'}")
        recipe = dataclasses.replace(self.recipe, **recipe_overrides)
        spec = ",".join(f"{k}={recipe_overrides[k]!r}".replace("'", "") for k in sorted(recipe_overrides))
        name = f"{self.name}{DERIVED_SEP}{spec}"
        if name not in _DERIVED:
            _DERIVED[name] = dataclasses.replace(self, name=name, recipe=recipe, paper_lds=None,
                                                 description=f"{self.description}; recipe changed: {spec}",
                                                 load_data=self.data)  # the base's data, loaded once
        return _DERIVED[name]

    def derived(self, spec: str) -> "Setting":
        """:meth:`derive` from the text after ``@`` in a derived setting's name, e.g. ``epochs=3,lr=0.1``."""
        name = f"{self.name}{DERIVED_SEP}{spec}"
        types = {f.name: f.type for f in dataclasses.fields(TrainRecipe)}
        overrides = {}
        for item in spec.split(","):
            key, eq, raw = item.partition("=")
            if not eq or key not in types:
                raise KeyError(f"bad derived setting {name!r}: write {self.name}{DERIVED_SEP}FIELD=VALUE[,FIELD=VALUE], "
                               f"FIELD one of {', '.join(types)}")
            if key in overrides:
                raise KeyError(f"bad derived setting {name!r}: {key} is given twice")
            overrides[key] = _parse_recipe_value(name, key, types[key], raw)
        return self.derive(**overrides)


_REGISTRY: dict[str, Setting] = {}
_DERIVED: dict[str, Setting] = {}
_DATA_CACHE: dict[str, ImageData] = {}
DERIVED_SEP = "@"
_LOADED = False


def register(setting: Setting) -> Setting:
    if setting.name in _REGISTRY and _REGISTRY[setting.name] is not setting:
        raise ValueError(f"setting {setting.name!r} is registered twice")
    _REGISTRY[setting.name] = setting
    return setting


def _ensure_loaded() -> None:
    global _LOADED
    if not _LOADED:
        from .plugins import load_plugins

        load_plugins("datasets")
        _LOADED = True


def available() -> dict[str, Setting]:
    """Every registered setting by name; none at all is an incomplete installation (an error saying why)."""
    from .plugins import empty_registry_error

    _ensure_loaded()
    if not _REGISTRY:
        raise empty_registry_error("datasets")
    return dict(sorted(_REGISTRY.items()))


def broken() -> dict[str, str]:
    """``{file: error}`` of the dataset files that failed to import (their settings are missing)."""
    from .plugins import broken as broken_plugins

    _ensure_loaded()
    return broken_plugins("datasets")


def get(name: str) -> Setting:
    """The setting called ``name`` (``base@field=value,...`` for a derived one): the registry's one lookup."""
    settings = available()
    base_name, sep, spec = name.partition(DERIVED_SEP)
    if base_name not in settings:
        trouble = broken()
        hint = ("; dataset files that failed to import: " + "; ".join(f"{f}: {e}" for f, e in trouble.items())
                if trouble else "")
        raise KeyError(f"unknown setting {base_name!r}" + (f" in {name!r}" if sep else "")
                       + f"; available: {', '.join(settings)}{hint}")
    return settings[base_name].derived(spec) if sep else settings[base_name]


def _resolve(name: str, recipe_hash: str | None) -> Setting:
    """Unpickling a Setting (in a worker process): the same name, checked to mean the same recipe."""
    setting = get(name)
    if recipe_hash is not None and setting.recipe_hash() != recipe_hash:
        raise ValueError(f"setting {name!r} has recipe {setting.recipe_hash()} in this process but {recipe_hash} in "
                         f"the process that sent it: the dataset files differ between them")
    return setting


def _parse_recipe_value(name: str, key: str, kind: str, raw: str):
    if kind == "bool":
        words = {"true": True, "1": True, "false": False, "0": False}
        if raw.lower() not in words:
            raise KeyError(f"bad derived setting {name!r}: {key} is true or false (or 1 / 0), got {raw!r}")
        return words[raw.lower()]
    try:
        return int(raw) if kind == "int" else float(raw) if kind == "float" else raw
    except ValueError:
        raise KeyError(f"bad derived setting {name!r}: {key} needs a {kind}, got {raw!r}") from None


def fixed_subset(data: ImageData, size: int, seed: int) -> ImageData:
    """A fixed, seeded subset of the training data (the small settings train on a few thousand points)."""
    if size > len(data.train_y):
        raise ValueError(f"subset of {size} requested from {len(data.train_y)} training points")
    idx = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(len(data.train_y), size, replace=False)))
    return ImageData(data.train_x[idx], data.train_y[idx], data.test_x, data.test_y, data.num_classes,
                     data.class_names)
