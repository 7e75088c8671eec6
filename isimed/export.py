"""Exports a pretrained encoder from a workdir's checkpoint, for use outside this project.

Formats (`isimed-export --workdir=DIR --format=...`):
  npz          `np.savez` of flat float32 arrays `params/encoder/<path>` and `batch_stats/<path>`
               (paths as in the flax pure dict, e.g. `params/encoder/stages/0/layers/0/conv1/kernel`)
               plus `config`, the pretraining config as a JSON string (a 0-d unicode array; the file
               loads with `allow_pickle=False`).
  safetensors  the same arrays through `safetensors.numpy`; the config JSON and the step are in the
               header's metadata (`pip install 'isimed[export]'`).
  monai        DenseNet-121 only: a PyTorch state_dict that MONAI's
               `DenseNet121(spatial_dims, in_channels=1, out_channels=embed_dim)` loads with
               `strict=True` (`pip install 'isimed[reference]'`), plus a JSON sidecar holding the
               config and those constructor arguments.

Arrays keep flax's conventions in npz and safetensors: convolution kernels `(*spatial, in, out)`,
dense kernels `(in, out)`, inputs channels-last `(N, *spatial, C)`. The monai format transposes
them to PyTorch's `(out, in, *spatial)` / `(out, in)`; its inputs are channels-first
`(N, C, *spatial)`. Parameters are float32 whatever the training compute dtype.
"""

from __future__ import annotations

import io
import json
import os
import struct
from typing import Any

import jax
import ml_collections
import numpy as np

from isimed import checkpoints
from isimed import models
from isimed import paths
from isimed import workdir as workdir_layout

FORMATS = ("npz", "safetensors", "monai")
SUFFIXES = {"npz": ".npz", "safetensors": ".safetensors", "monai": ".pt"}
CONFIG_KEY = "config"  # npz: the config JSON; safetensors: its metadata key.


def encoder_arrays(params: dict, batch_stats: dict) -> dict[str, np.ndarray]:
    """Flat `params/encoder/<path>` and `batch_stats/<path>` numpy arrays of an encoder's
    parameters and BatchNorm statistics (flax pure dicts), sorted by key."""
    flat = {**_flatten(params, "params/encoder"), **_flatten(batch_stats, "batch_stats")}
    return dict(sorted(flat.items()))


def unflatten(arrays: dict[str, np.ndarray]) -> tuple[dict, dict]:
    """`(params, batch_stats)` pure dicts of the encoder from `encoder_arrays`' flat keys (integer
    path parts become int keys again, as flax's lists have), ready for `nnx.merge` with the graph of
    `isimed.train_state.Networks(config)` or `isimed.models.create_encoder`."""
    trees: dict[str, dict] = {"params/encoder": {}, "batch_stats": {}}
    for key, value in arrays.items():
        prefix = next((p for p in trees if key.startswith(p + "/")), None)
        if prefix is None:
            raise ValueError(f"unexpected array {key!r}: keys start with params/encoder/ or batch_stats/")
        node = trees[prefix]
        *parents, leaf = [int(k) if k.isdigit() else k for k in key[len(prefix) + 1 :].split("/")]
        for k in parents:
            node = node.setdefault(k, {})
        node[leaf] = value
    return trees["params/encoder"], trees["batch_stats"]


def export(workdir: str, fmt: str, *, step: int | None = None, out: str | None = None) -> dict[str, Any]:
    """Writes the encoder of `workdir`'s checkpoint (latest step by default) in `fmt` to `out`
    (default `<workdir>/export/encoder_step<N>.<npz|safetensors|pt>`).

    Returns `{"path", "format", "step", "arrays"}` (plus `"sidecar"` for monai).
    """
    _check_format(fmt)
    config, _, state = checkpoints.load_encoder(workdir, step)
    step = int(state["step"])
    if out is None:
        out = os.fspath(workdir_layout.Workdir(workdir).export / f"encoder_step{step}{SUFFIXES[fmt]}")
    arrays = encoder_arrays(state["params"]["encoder"], state["batch_stats"])
    return write(arrays, config, step, fmt, out)


def write(
    arrays: dict[str, np.ndarray], config: ml_collections.ConfigDict, step: int, fmt: str, out: str
) -> dict[str, Any]:
    """Writes `encoder_arrays` output in `fmt` to `out` (a local path or a URI); see the module
    docstring for the formats."""
    _check_format(fmt)
    config_json = json.dumps(config.to_dict(), sort_keys=True)
    path = paths.resolve(out)
    if fmt == "monai":
        state_dict = monai_state_dict(arrays, config, step)  # Checks everything before writing.
    path.parent.mkdir(parents=True, exist_ok=True)
    result = {"path": os.fspath(path), "format": fmt, "step": step, "arrays": len(arrays)}
    if fmt == "npz":
        buffer = io.BytesIO()
        np.savez(buffer, **arrays, **{CONFIG_KEY: np.array(config_json), "step": np.array(step, np.int64)})
        path.write_bytes(buffer.getvalue())
    elif fmt == "safetensors":
        safetensors_numpy = _import("safetensors.numpy", "the safetensors format", "export")
        metadata = {CONFIG_KEY: config_json, "step": str(step)}
        contiguous = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        path.write_bytes(safetensors_numpy.save(contiguous, metadata=metadata))
    else:
        torch = _import("torch", "the monai format (a PyTorch state_dict)", "reference")
        buffer = io.BytesIO()
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state_dict.items()}, buffer)
        path.write_bytes(buffer.getvalue())
        sidecar = path.with_suffix(".json")
        sidecar.write_text(
            json.dumps(
                {
                    "step": step,
                    "monai": {"class": "monai.networks.nets.DenseNet121", **monai_arguments(config)},
                    "input": "channels-first (N, C, *spatial) float32, intensities normalised as in training",
                    "config": json.loads(config_json),
                },
                indent=2,
            )
        )
        result["sidecar"] = os.fspath(sidecar)
    return result


def load(path: str) -> tuple[dict[str, np.ndarray], ml_collections.ConfigDict, int]:
    """`(arrays, config, step)` from an npz or safetensors export (never unpickles anything)."""
    path = paths.resolve(path)
    data = path.read_bytes()
    if path.suffix == ".npz":
        with np.load(io.BytesIO(data), allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files if k not in (CONFIG_KEY, "step")}
            config, step = json.loads(str(z[CONFIG_KEY])), int(z["step"])
    elif path.suffix == ".safetensors":
        safetensors_numpy = _import("safetensors.numpy", "the safetensors format", "export")
        arrays = safetensors_numpy.load(data)
        metadata = _safetensors_metadata(data)
        config, step = json.loads(metadata[CONFIG_KEY]), int(metadata["step"])
    else:
        raise ValueError(f"{path}: load reads .npz and .safetensors exports (a .pt export: torch.load)")
    return dict(sorted(arrays.items())), ml_collections.ConfigDict(config), step


def _safetensors_metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors file: an 8-byte little-endian header size, then the
    JSON header."""
    (size,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8 : 8 + size]).get("__metadata__", {})


# MONAI DenseNet121 -------------------------------------------------------------------------------


def monai_arguments(config: ml_collections.ConfigDict) -> dict[str, int]:
    """Keyword arguments of MONAI's `DenseNet121` for this config's encoder."""
    return {
        "spatial_dims": len(config.data.crop_size),
        "in_channels": 1,
        "out_channels": int(config.model.embed_dim),
    }


def monai_state_dict(
    arrays: dict[str, np.ndarray], config: ml_collections.ConfigDict, step: int = 0
) -> dict[str, np.ndarray]:
    """MONAI `DenseNet121` state_dict (numpy arrays) from a DenseNet-121 encoder's flat arrays.

    Layer for layer the two networks are the same (`isimed/models/densenet.py` follows MONAI):
    stem conv, BN, ReLU, 3x3/2 max pool -> dense blocks of BN-ReLU-1x1 conv-BN-ReLU-3x3 conv (each
    output concatenated to its input), with BN-ReLU-1x1 conv-2x2/2 average pool transitions ->
    final BN, ReLU, global average pool, Linear. Conv kernels are transposed from flax's
    `(*spatial, in, out)` to PyTorch's `(out, in, *spatial)`, the Linear kernel from `(in, out)` to
    `(out, in)`; BatchNorm scale/bias/mean/var become weight/bias/running_mean/running_var, and
    `num_batches_tracked` is the training step (one statistics update per step). Every array is
    used exactly once, or ValueError.
    """
    if config.model.name != "densenet121":
        raise ValueError(
            f"the monai format maps DenseNet-121 to MONAI's DenseNet121; this checkpoint's encoder is "
            f"{config.model.name!r} (export it as npz or safetensors)"
        )
    block_config = models.MODELS["densenet121"].keywords["block_config"]
    unused = set(arrays)
    out: dict[str, np.ndarray] = {}

    def take(key: str) -> np.ndarray:
        if key not in arrays:
            raise ValueError(f"the DenseNet-121 export needs {key!r}, which the checkpoint lacks")
        unused.discard(key)
        return np.asarray(arrays[key], np.float32)

    def conv(torch_name: str, flax_path: str) -> None:
        kernel = take(f"params/encoder/{flax_path}/kernel")
        n = kernel.ndim - 2
        out[f"{torch_name}.weight"] = np.transpose(kernel, (n + 1, n, *range(n)))

    def norm(torch_name: str, flax_path: str) -> None:
        out[f"{torch_name}.weight"] = take(f"params/encoder/{flax_path}/scale")
        out[f"{torch_name}.bias"] = take(f"params/encoder/{flax_path}/bias")
        out[f"{torch_name}.running_mean"] = take(f"batch_stats/{flax_path}/mean")
        out[f"{torch_name}.running_var"] = take(f"batch_stats/{flax_path}/var")
        out[f"{torch_name}.num_batches_tracked"] = np.array(step, np.int64)

    conv("features.conv0", "stem")
    norm("features.norm0", "stem_bn")
    for i, num_layers in enumerate(block_config):
        for j in range(num_layers):
            torch_layer = f"features.denseblock{i + 1}.denselayer{j + 1}.layers"
            flax_layer = f"stages/{i}/layers/{j}"
            norm(f"{torch_layer}.norm1", f"{flax_layer}/bn1")
            conv(f"{torch_layer}.conv1", f"{flax_layer}/conv1")
            norm(f"{torch_layer}.norm2", f"{flax_layer}/bn2")
            conv(f"{torch_layer}.conv2", f"{flax_layer}/conv2")
        if i < len(block_config) - 1:  # The transition is the stage's last layer.
            norm(f"features.transition{i + 1}.norm", f"stages/{i}/layers/{num_layers}/bn")
            conv(f"features.transition{i + 1}.conv", f"stages/{i}/layers/{num_layers}/conv")
    norm("features.norm5", "final_bn")
    out["class_layers.out.weight"] = take("params/encoder/head/kernel").T
    out["class_layers.out.bias"] = take("params/encoder/head/bias")
    if unused:
        raise ValueError(f"arrays with no MONAI DenseNet121 counterpart: {sorted(unused)[:5]}")
    if out["features.conv0.weight"].shape[1] != 1:
        raise ValueError(f"MONAI export expects 1 input channel, got {out['features.conv0.weight'].shape[1]}")
    return out


# Helpers -----------------------------------------------------------------------------------------


def _flatten(tree: dict, prefix: str) -> dict[str, np.ndarray]:
    return {
        "/".join([prefix, *(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)]): np.asarray(
            jax.device_get(leaf)
        )
        for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
    }


def _check_format(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"unknown export format {fmt!r}; use one of: {', '.join(FORMATS)}")


def _import(module: str, what: str, extra: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        raise ImportError(
            f"{what} needs {module.split('.')[0]}, which is not installed: pip install 'isimed[{extra}]'"
        ) from None
