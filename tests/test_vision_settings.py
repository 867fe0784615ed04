"""Natural-image settings (Flowers102 + ResNet-50, Food-101 + ViT-B/16) and the reduced timm settings, on tiny
image data made here and small randomly initialised timm models of the same families, through the code the
real settings use. Nothing here touches the network: where the hub would be asked, it is made unreachable.
"""

import dataclasses
import socket
import sys
import time

import numpy as np
import pytest
import torch

from benchmark.setup import settings
from benchmark.setup.config import DataSpec, TrainRecipe
from benchmark.setup.data import DataError
from benchmark.setup.plugins import REPO_ROOT, load_plugin_file
from eval_helpers import require_real_data

LARGE = ("flowers102-resnet50", "food101-vitb16")
REDUCED = ("fmnist-resnet", "mnist-vit")


def _plugin(name):
    return load_plugin_file(REPO_ROOT / "datasets" / f"{name}.py", "datasets")


def test_settings_register_and_list_without_timm(monkeypatch, capsys):
    """`tdabench settings` must work where the vision extra is not installed."""
    from benchmark import cli

    for mod in ("timm", "datasets", "huggingface_hub"):
        monkeypatch.setitem(sys.modules, mod, None)  # `import timm` now raises ImportError
    assert cli.main(["settings"]) == 0
    out = capsys.readouterr().out
    for name in LARGE + REDUCED:
        block = out.split(name, 1)[1].split("\n")[1]
        assert "unavailable here (requires timm" in block and "pip install 'tdabench[vision]'" in block, block
    s = settings.get("flowers102-resnet50")
    assert s.requires == ("timm", "datasets") and s.paper_lds == 0.46
    assert settings.get("food101-vitb16").paper_lds == 0.43
    # What a model starts from is part of the recipe, so artifacts from other starting points never mix.
    assert s.data_spec.extra["pretrained"] == "resnet50.tv_in1k"
    assert settings.get("fmnist-resnet").data_spec.extra["pretrained"] is None


# ---------------------------------------------------------------- everything below needs the vision extra

timm = pytest.importorskip("timm", reason="the vision extra is not installed (pip install 'tdabench[vision]')")
hf_datasets = pytest.importorskip("datasets", reason="the vision extra is not installed (pip install 'tdabench[vision]')")

from benchmark.setup import vision  # noqa: E402
from benchmark.setup.training import evaluate, train  # noqa: E402

RED, BLUE, GREY = (255, 0, 0), (0, 0, 255), (128, 128, 128)


def _image(kind, w, h):
    from PIL import Image

    if kind == "halves":  # left half red, right half blue: catches transposed axes and bad crops
        a = np.zeros((h, w, 3), np.uint8)
        a[:, : w // 2] = RED
        a[:, w // 2:] = BLUE
        return Image.fromarray(a)
    return Image.new("L", (w, h), GREY[0])  # greyscale: must come out as 3 equal channels


@pytest.fixture()
def tiny_hub(tmp_path, monkeypatch):
    """A tiny 3-class dataset with train/validation/test splits saved where the loader looks for a local copy."""
    monkeypatch.setenv("TDABENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    features = hf_datasets.Features({"image": hf_datasets.Image(),
                                     "label": hf_datasets.ClassLabel(names=["rose", "tulip", "daisy"])})

    def split(n, offset):
        kinds = ["halves" if i % 2 == 0 else "grey" for i in range(n)]
        sizes = [(40 + 3 * i, 20 + i) if k == "halves" else (18 + i, 30) for i, k in enumerate(kinds)]
        return hf_datasets.Dataset.from_dict(
            {"image": [_image(k, w, h) for k, (w, h) in zip(kinds, sizes)],
             "label": [(i + offset) % 3 for i in range(n)]}, features=features)

    dd = hf_datasets.DatasetDict({"train": split(6, 0), "validation": split(4, 1), "test": split(5, 2)})
    dd.save_to_disk(str(tmp_path / "data" / "tinyflowers" / "hf"))
    spec = vision.HubImageDataset(name="tinyflowers", repo="nobody/tiny-flowers", train_splits=("train", "validation"),
                                  test_split="test", num_classes=3, train_size=10, test_size=5)
    return spec, vision.ImageTransform(resize=20, crop=16, interpolation="bilinear")


def test_tiny_dataset_is_prepared_cached_and_verified(tiny_hub, tmp_path):
    spec, tf = tiny_hub
    data = vision.load_hub_images(spec, tf)  # memory-mapped: the copies below outlive the damage done later
    train_x, test_y = data.train_x.clone(), data.test_y.clone()
    assert data.train_x.shape == (10, 3, 16, 16) and data.train_x.dtype == torch.uint8
    assert data.test_x.shape == (5, 3, 16, 16)
    assert data.train_y.tolist() == [i % 3 for i in range(6)] + [(i + 1) % 3 for i in range(4)]  # train, then val
    assert data.class_names == ("rose", "tulip", "daisy") and data.num_classes == 3
    halves = data.train_x[0].numpy()
    assert (halves[:, :, :6] == np.array(RED)[:, None, None]).all()  # left of the centre crop
    assert (halves[:, :, 10:] == np.array(BLUE)[:, None, None]).all()
    assert (data.train_x[1].numpy() == GREY[0]).all()

    # The prepared cache alone serves the next load: the local copy is not read again.
    folder = vision.prepared_dir(spec, tf)
    assert (folder / "meta.json").is_file()
    import shutil

    shutil.move(str(tmp_path / "data" / "tinyflowers" / "hf"), str(tmp_path / "hf-moved"))
    again = vision.load_hub_images(spec, tf)
    assert torch.equal(again.train_x, train_x) and torch.equal(again.test_y, test_y)

    # A damaged cache is not used: it is rebuilt from the source when there is one, else a clear error.
    blob = bytearray((folder / "test_y.npy").read_bytes())
    blob[-1] ^= 1
    (folder / "test_y.npy").write_bytes(bytes(blob))
    with pytest.raises(DataError, match=r"(?s)fails its checksum.*local copy .*not there"):
        vision.load_hub_images(spec, tf)
    shutil.move(str(tmp_path / "hf-moved"), str(tmp_path / "data" / "tinyflowers" / "hf"))
    assert torch.equal(vision.load_hub_images(spec, tf).test_y, test_y)

    # A source of another size than the setting expects is an error, never a silent change.
    with pytest.raises(DataError, match="expects 12 and 5"):
        vision.load_hub_images(dataclasses.replace(spec, train_size=12), tf)
    with pytest.raises(DataError, match=r"splits \['test', 'train', 'validation'\], not \['val'\]"):
        vision.load_hub_images(dataclasses.replace(spec, train_splits=("train", "val")), tf)


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def test_unreachable_hub_is_a_fast_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv("TDABENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    for var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_CACHE"):
        monkeypatch.delenv(var, raising=False)
    spec = _plugin("flowers102").FLOWERS102

    # Offline (as in the tests): the hub is not asked, and the error says how to provide the data.
    monkeypatch.setenv("TDABENCH_OFFLINE", "1")
    with pytest.raises(DataError) as err:
        vision.load_hub_images(spec, _plugin("flowers102").TRANSFORM)
    msg = str(err.value)
    assert "cannot obtain dataset 'flowers102'" in msg and "dpdl-benchmark/oxford_flowers102" in msg
    for hint in ("TDABENCH_OFFLINE is set", "tdabench data", "save_to_disk", "HF_HUB_OFFLINE=1", "TDABENCH_DATA"):
        assert hint in msg, hint

    # Online but the hub cannot be reached: a quick probe fails, no retries for minutes.
    monkeypatch.delenv("TDABENCH_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{_closed_port()}")
    t0 = time.perf_counter()
    with pytest.raises(DataError, match=r"(?s)hub http://127\.0\.0\.1:\d+: unreachable for dataset"):
        vision.load_hub_images(spec, _plugin("flowers102").TRANSFORM)
    with pytest.raises(vision.WeightsError) as err:
        vision.pretrained_weights("resnet50.tv_in1k")
    assert time.perf_counter() - t0 < 15
    msg = str(err.value)
    assert "unreachable for weights timm/resnet50.tv_in1k" in msg
    assert str(tmp_path / "data" / "weights" / "resnet50.tv_in1k.safetensors") in msg
    assert str(tmp_path / "hf-home" / "hub") in msg


def test_pretrained_weights_are_loaded_and_the_new_head_is_seeded(tmp_path, monkeypatch):
    """Fine-tuning starts from the pretrained backbone; only the new head depends on the seed."""
    from safetensors.torch import save_file

    monkeypatch.setenv("TDABENCH_DATA", str(tmp_path / "data"))
    torch.manual_seed(123)
    source = timm.create_model("test_resnet", pretrained=False)  # stands in for a downloaded checkpoint
    (tmp_path / "data" / "weights").mkdir(parents=True)
    save_file(source.state_dict(), str(tmp_path / "data" / "weights" / "test_resnet.r160_in1k.safetensors"))

    build = vision.TimmModel("test_resnet", 5, pretrained="test_resnet.r160_in1k",
                             normalize=(vision.IMAGENET_MEAN, vision.IMAGENET_STD))
    s = settings.Setting("tiny-pretrained", "test", lambda: None, DataSpec("none"), build,
                         TrainRecipe(epochs=1, batch_size=4, lr=0.01))
    a, b, c = s.model(0), s.model(0), s.model(1)
    assert isinstance(a[0], vision.ImageNormalize) and a[1].get_classifier().out_features == 5
    backbone = {k: v for k, v in source.state_dict().items() if not k.startswith("fc.")}
    got = a[1].state_dict()
    assert all(torch.equal(got[k], v) for k, v in backbone.items())
    assert torch.equal(a[1].fc.weight, b[1].fc.weight) and not torch.equal(a[1].fc.weight, c[1].fc.weight)
    assert len(s.recipe_hash()) == 16  # the recipe builds where the weights are present

    with pytest.raises(ValueError, match="not for architecture"):
        vision.TimmModel("resnet50", 5, pretrained="test_resnet.r160_in1k")


@pytest.mark.parametrize("arch,options", [
    ("resnet18", {"layers": (1, 1, 1, 1), "channels": (8, 16, 32, 64), "stem_width": 8}),
    ("vit_tiny_patch16_224", {"img_size": 16, "patch_size": 4, "embed_dim": 32, "depth": 2, "num_heads": 2}),
])
def test_small_timm_models_train_on_prepared_images(tiny_hub, arch, options):
    """uint8 images -> ImageNormalize -> timm model, trained and evaluated by the benchmark's own loop."""
    spec, tf = tiny_hub
    data = vision.load_hub_images(spec, tf)
    build = vision.TimmModel(arch, spec.num_classes, normalize=(tf.mean, tf.std), options=options)
    recipe = TrainRecipe(epochs=2, batch_size=4, lr=0.05, momentum=0.9, weight_decay=1e-4)
    s = settings.Setting("tiny-" + arch, "test", lambda: data, DataSpec("tinyflowers"), build, recipe)
    model = s.model(7)
    before = [p.detach().clone() for p in model.parameters()]
    trained = train(model, data.train_x, data.train_y, recipe, seed=7)
    assert any(not torch.equal(p0, p1) for p0, p1 in zip(before, trained.parameters()))
    out = evaluate(trained, data.test_x, data.test_y)
    assert out["margin"].shape == (5,) and torch.isfinite(out["margin"]).all()
    again = train(s.model(7), data.train_x, data.train_y, recipe, seed=7)  # determinism for a seed
    assert all(torch.equal(p, q) for p, q in zip(trained.state_dict().values(), again.state_dict().values()))
    # Raw pixels in any dtype mean the same: float64 pixel values give the float64 model the same answer.
    x = data.test_x[:2]
    assert torch.allclose(trained.double()(x.double()).float(), trained.float()(x), atol=1e-4)


def test_vit_attention_has_forward_mode_and_vmap_derivatives():
    """Curvature-vector products (CG, LiSSA) need forward-mode AD through attention; timm's fused kernel has none."""
    from torch.func import functional_call, jvp, vmap

    model = vision.TimmModel("vit_tiny_patch16_224", 3, options={"img_size": 16, "patch_size": 4, "embed_dim": 32,
                                                                 "depth": 1, "num_heads": 2})().eval()
    assert [m.fused_attn for m in model.modules() if hasattr(m, "fused_attn")] == [False]
    params = {k: v.detach() for k, v in model.named_parameters()}
    x = torch.randn(2, 3, 16, 16)
    tangents = {k: torch.randn_like(v) for k, v in params.items()}
    _, out = jvp(lambda p: functional_call(model, p, (x,)), (params,), (tangents,))
    assert out.shape == (2, 3) and torch.isfinite(out).all()
    per_example = vmap(lambda xi: functional_call(model, params, (xi[None],)))(x)
    assert torch.allclose(per_example[:, 0], model(x), atol=1e-5)


def test_large_settings_prepare_inputs_as_their_weights_expect():
    """The transform of each large setting matches the preprocessing its pretrained weights were trained with."""
    for plugin in ("flowers102", "food101"):
        mod = _plugin(plugin)
        cfg = timm.models.get_pretrained_cfg(mod.MODEL.pretrained)
        tf = mod.TRANSFORM
        assert (tf.crop, tf.crop) == tuple(cfg.input_size[1:])
        assert tf.resize == int(tf.crop / cfg.crop_pct)
        assert tf.interpolation == cfg.interpolation
        assert tuple(tf.mean) == tuple(cfg.mean) and tuple(tf.std) == tuple(cfg.std)
        assert mod.MODEL.normalize == (tf.mean, tf.std)
        s = settings.get({"flowers102": LARGE[0], "food101": LARGE[1]}[plugin])
        ds = getattr(mod, plugin.upper())
        assert s.build_model is mod.MODEL and s.data_spec.extra["pretrained"] == mod.MODEL.pretrained
        assert (s.data_spec.train_size, s.data_spec.test_size) == (ds.train_size, ds.test_size)
        p = s.protocols["default"]
        assert p.queries + p.validation_queries <= ds.test_size and (p.subsets, p.alpha, p.queries) == (100, 0.5, 2000)


@pytest.mark.parametrize("name", REDUCED)
def test_reduced_settings_train_on_a_slice_of_their_real_data(name):
    s = settings.get(name)
    data = require_real_data(s)  # a skip saying why, or a failure where CI installed the data
    assert len(data.train_y) == s.data_spec.train_size and len(data.test_y) == 10000
    recipe = dataclasses.replace(s.recipe, epochs=1)
    model = train(s.model(0), data.train_x, data.train_y, recipe, seed=0, indices=torch.arange(256))
    out = evaluate(model, data.test_x[:64], data.test_y[:64])
    assert torch.isfinite(out["loss"]).all()
    assert len(s.recipe_hash()) == 16


@pytest.mark.parametrize("arch,options,held_constant", [
    ("resnet18", {"layers": (1, 1, 1, 1), "channels": (4, 8, 8, 8), "stem_width": 4}, "normalisation layer (BatchNorm2d)"),
    ("vit_tiny_patch16_224", {"img_size": 8, "patch_size": 4, "embed_dim": 8, "depth": 2, "num_heads": 2},
     "normalisation layer (LayerNorm)"),
])
def test_ekfac_on_small_timm_models_matches_the_ggn_trace(arch, options, held_constant):
    """EK-FAC covers every Linear and Conv2d of a timm ResNet / ViT (convolutions with stride and padding,
    attention projections over tokens), holds norms and tokens constant and records it. With every pseudo-label,
    the refitted eigenvalues of a layer sum to the trace of its GGN block (the trace is basis-free), which we
    compute independently from explicit per-example Jacobians of the logits."""
    from torch.func import functional_call, jacrev, vmap

    from benchmark.evaluate import Task, registry

    torch.manual_seed(0)
    model = vision.TimmModel(arch, 3, options=options)().double().eval()
    x = torch.randn(6, 3, 8, 8, dtype=torch.float64)
    y = torch.randint(0, 3, (6,))
    task = Task(model, x, y, num_classes=3)
    s = registry.get("ekfac")(damping=0.1, pseudo_labels="all").fit(task)
    info = s.info()
    assert held_constant in info["excluded"] and 0 < info["attributed_params"] < info["total_params"]
    if arch.startswith("vit"):
        assert any("pos_embed" in n for names in info["excluded"].values() for n in names)
    factored = {n for layer in s.layers for n in (layer.weight, layer.bias) if n}
    assert factored == set(s.attributed)  # every Linear/Conv2d parameter is attributed, nothing else
    assert all(isinstance(m, (torch.nn.Linear, torch.nn.Conv2d)) == (f"{p}.weight" in factored)
               for p, m in model.named_modules() if getattr(m, "weight", None) is not None)

    fm = s.functional()
    jac = vmap(jacrev(lambda p, xi: functional_call(model, (p, fm.buffers), (xi[None],))[0]),
               in_dims=(None, 0))(fm.params, x)
    p = torch.softmax(model(x), -1)
    H = torch.diag_embed(p) - p[:, :, None] * p[:, None, :]
    for layer in s.layers:
        J = torch.cat([jac[n].reshape(len(x), 3, -1) for n in (layer.weight, layer.bias) if n], -1)
        trace = torch.einsum("nab,nbp,nap->", H, J, J) / len(x)
        torch.testing.assert_close(s.eigenvalues[layer.path].sum(), trace, rtol=1e-8, atol=1e-12)

    scores = s.scores(x[:2], y[:2], x, y)
    assert scores.shape == (2, 6) and torch.isfinite(scores).all()
    last = registry.get("ekfac")(damping=0.1, last_blocks=1).fit(task).info()
    assert last["attributed_params"] < info["attributed_params"] and last["blocks"] == [last["blocks"][0]]


def test_leaderboard_lists_the_large_rows_as_not_yet_run(tmp_path, monkeypatch):
    """Table 1's large rows appear even where their data, weights and ground truth are absent: "not yet run",
    with where to go, and no numbers."""
    from benchmark.evaluate import campaign, registry
    from benchmark.report import leaderboard
    from benchmark.setup.store import ResultsStore

    monkeypatch.setenv("TDABENCH_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("TDABENCH_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    assert set(LARGE) <= {s.name for s in campaign.leaderboard_settings()}
    df, records = leaderboard.collect(ResultsStore(tmp_path), [settings.get(n) for n in LARGE],
                                      campaign.leaderboard_methods(registry.available()))
    assert not records and set(df["setting"]) == set(LARGE)
    missing = {n for n, cls in registry.available().items() if cls.unavailable()}  # a peer extra not installed
    assert df[df["solver"].isin(missing)]["status"].str.startswith("n/a: needs").all()
    # The declared limits (every one is far below these models' 23.7M and 86M parameters) decide the rest.
    solvers = {n: cls for n, cls in registry.available().items() if n not in missing}
    hard = {n for n, cls in solvers.items() if cls.max_params is not None}
    soft = {n for n, cls in solvers.items() if cls.max_params is None and cls.leaderboard_max_params is not None}
    assert {"exact", "unrolled"} <= hard and {"cg", "lissa"} <= soft
    applicable = df[~df["solver"].isin([*hard, *soft, *missing])]
    assert applicable["status"].str.startswith("not yet run (no ground truth; GPU runbook").all()
    capped = df[df["solver"].isin(hard)]
    assert capped["status"].str.startswith("n/a: model has").all()  # counted without weights
    assert df[df["solver"].isin(soft)]["status"].str.startswith("n/a: not run automatically").all()
    assert df["lds"].isna().all() and set(df["paper_lds"]) == {0.46, 0.43}
