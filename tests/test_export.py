"""isimed.export: npz / safetensors round trips from a real checkpoint, and the MONAI DenseNet121
state_dict giving the JAX encoder's embeddings."""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

from isimed import checkpoints
from isimed import export
from isimed import models

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HAVE_TORCH_MONAI = all(importlib.util.find_spec(m) for m in ("torch", "monai"))


def _formats():
    have = importlib.util.find_spec("safetensors") is not None
    skip = pytest.mark.skipif(not have, reason="safetensors not installed: pip install -e '.[export]'")
    return ["npz", pytest.param("safetensors", marks=skip)]


@pytest.mark.parametrize("fmt", _formats())
def test_round_trip_gives_the_checkpoint_arrays_config_and_embeddings(pretrained, tmp_path, fmt):
    workdir, _ = pretrained
    config, networks, state = checkpoints.load_encoder(workdir)
    result = export.export(workdir, fmt, out=str(tmp_path / f"encoder.{fmt}"))
    arrays, loaded_config, step = export.load(result["path"])

    assert step == result["step"] == int(state["step"]) == config.total_steps
    assert loaded_config.to_dict() == config.to_dict()
    expected = export.encoder_arrays(state["params"]["encoder"], state["batch_stats"])
    assert list(arrays) == list(expected) and len(arrays) == result["arrays"]
    assert any(k.startswith("params/encoder/") for k in arrays)
    assert any(k.startswith("batch_stats/") for k in arrays)
    for key, value in expected.items():
        assert arrays[key].dtype == np.float32 and np.array_equal(arrays[key], value), key

    # The file alone rebuilds the encoder: same embeddings as the checkpoint, bit for bit.
    params, batch_stats = export.unflatten(arrays)
    crops = np.random.default_rng(0).normal(size=(3, *config.data.crop_size, 1)).astype(np.float32)
    z_file = networks.apply(params, batch_stats, crops, train=False)[0]
    z_ckpt = networks.apply(state["params"]["encoder"], state["batch_stats"], crops, train=False)[0]
    np.testing.assert_array_equal(np.asarray(z_file), np.asarray(z_ckpt))


def test_npz_export_holds_no_objects(pretrained, tmp_path):
    result = export.export(pretrained[0], "npz", out=str(tmp_path / "encoder.npz"))
    with np.load(result["path"], allow_pickle=False) as z:
        assert all(z[k].dtype != object for k in z.files)
        assert z["config"].dtype.kind == "U" and z["config"].shape == ()
        assert json.loads(str(z["config"]))["model"]["name"] == "small_cnn"


def test_cli_writes_to_the_default_path_and_refuses_monai_for_other_encoders(pretrained, tmp_path):
    workdir = str(tmp_path / "run")
    shutil.copytree(pretrained[0], workdir)  # The default output lands inside the workdir.
    command = [sys.executable, "-c", "from isimed import cli; cli.run_export()", f"--workdir={workdir}"]
    done = subprocess.run(command + ["--format=npz"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    step = checkpoints.load_encoder(workdir)[2]["step"]
    path = os.path.join(workdir, "export", f"encoder_step{int(step)}.npz")
    assert f"wrote {path} (npz, step {int(step)}," in done.stdout
    assert os.path.isfile(path)

    with pytest.raises(ValueError, match="maps DenseNet-121 .* encoder is 'small_cnn'"):
        export.export(workdir, "monai", out=str(tmp_path / "x.pt"))
    with pytest.raises(ValueError, match="unknown export format 'onnx'"):
        export.export(workdir, "onnx")


def _densenet_arrays(spatial_dims: int, embed_dim: int, seed: int = 0) -> tuple[dict, nnx.GraphDef]:
    """A DenseNet-121's flat arrays with non-trivial BatchNorm parameters and statistics (the
    initial ones are scale 1, bias 0, mean 0, var 1), and its eval graph."""
    encoder = models.create_encoder(
        "densenet121", spatial_dims=spatial_dims, embed_dim=embed_dim, rngs=nnx.Rngs(seed)
    )
    encoder.eval()
    graph, params, stats = nnx.split(encoder, nnx.Param, ...)
    rng = np.random.default_rng(seed + 1)
    draw = {
        "scale": lambda s: rng.uniform(0.5, 1.5, s),
        "bias": lambda s: rng.normal(0.0, 0.1, s),
        "mean": lambda s: rng.normal(0.0, 0.1, s),
        "var": lambda s: rng.uniform(1.0, 3.0, s),
    }

    def perturb(path, x):
        name = path[-1].key
        value = draw[name](x.shape) if name in draw and x.ndim == 1 else np.asarray(x)
        return value.astype(np.float32)

    params = jax.tree_util.tree_map_with_path(perturb, nnx.to_pure_dict(params))
    stats = jax.tree_util.tree_map_with_path(perturb, nnx.to_pure_dict(stats))
    return export.encoder_arrays(params, stats), graph


@pytest.mark.skipif(not HAVE_TORCH_MONAI, reason="needs torch and monai: pip install -e '.[reference]'")
@pytest.mark.parametrize("spatial_dims,crop", [(2, (64, 64)), (3, (32, 32, 32))])
def test_monai_densenet121_gives_the_jax_embeddings(tmp_path, spatial_dims, crop):
    import torch
    from monai.networks.nets import DenseNet121

    embed_dim, step = 16, 7
    arrays, graph = _densenet_arrays(spatial_dims, embed_dim)
    config = ml_collections.ConfigDict(
        {"model": {"name": "densenet121", "embed_dim": embed_dim}, "data": {"crop_size": crop}}
    )
    result = export.write(arrays, config, step, "monai", str(tmp_path / "encoder.pt"))
    sidecar = json.loads(open(result["sidecar"]).read())
    kwargs = {k: v for k, v in sidecar["monai"].items() if k != "class"}
    assert kwargs == {"spatial_dims": spatial_dims, "in_channels": 1, "out_channels": embed_dim}

    network = DenseNet121(**kwargs)
    state_dict = torch.load(result["path"], weights_only=True)
    network.load_state_dict(state_dict, strict=True)
    assert int(state_dict["features.norm5.num_batches_tracked"]) == step
    network.eval()

    crops = np.random.default_rng(2).normal(size=(2, *crop, 1)).astype(np.float32)
    with torch.no_grad():
        z_torch = network(torch.from_numpy(np.ascontiguousarray(np.moveaxis(crops, -1, 1)))).numpy()
    params, batch_stats = export.unflatten(arrays)
    z_jax = np.asarray(nnx.jit(lambda m, x: m(x))(nnx.merge(graph, params, batch_stats), crops))

    diff = np.abs(z_torch - z_jax)
    print(
        f"{spatial_dims}D: max |z| {np.abs(z_jax).max():.4g}, max abs diff {diff.max():.3g}, "
        f"max rel diff {(diff / np.abs(z_jax)).max():.3g}"
    )
    assert z_torch.shape == z_jax.shape == (2, embed_dim) and z_jax.std() > 0.1
    np.testing.assert_allclose(z_torch, z_jax, rtol=1e-4, atol=1e-6 * np.abs(z_jax).max())


def test_monai_state_dict_uses_every_array_exactly_once():
    arrays, _ = _densenet_arrays(2, 8)
    config = ml_collections.ConfigDict(
        {"model": {"name": "densenet121", "embed_dim": 8}, "data": {"crop_size": (64, 64)}}
    )
    state_dict = export.monai_state_dict(arrays, config)
    # Each BatchNorm's 4 arrays become 5 entries (+ num_batches_tracked); DenseNet-121 has 121.
    num_norms = sum(k.startswith("batch_stats/") and k.endswith("/mean") for k in arrays)
    assert num_norms == 121 and len(state_dict) == len(arrays) + num_norms
    assert state_dict["features.conv0.weight"].shape == (64, 1, 7, 7)
    assert state_dict["features.denseblock1.denselayer1.layers.conv2.weight"].shape == (32, 128, 3, 3)
    assert state_dict["class_layers.out.weight"].shape == (8, 1024)
    with pytest.raises(ValueError, match="no MONAI DenseNet121 counterpart.*extra"):
        export.monai_state_dict({**arrays, "params/encoder/extra/kernel": np.zeros(1)}, config)
    missing = dict(arrays)
    del missing["batch_stats/final_bn/var"]
    with pytest.raises(ValueError, match="needs 'batch_stats/final_bn/var'"):
        export.monai_state_dict(missing, config)
