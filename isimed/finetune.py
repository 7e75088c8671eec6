"""Fine-tuning a pretrained encoder on few labels, on the one training loop (`isimed.train.run_job`):
`finetune(config, workdir)`.

The model is the encoder plus a zero-initialised linear head on its embedding (as it is, or each
row standardised: `finetune.head_norm`, `head_input`). Modes:

  linear  the encoder is frozen: eval-mode BatchNorm (running statistics, never updated), no
          gradient, no optimiser state; its parameters leave training bit for bit as they came.
  full    the encoder trains too, at `finetune.encoder_lr_mult` times the head's learning rate,
          with train-mode BatchNorm; `finetune.head_only_steps` first train the head alone (the
          encoder's learning rate is 0 and its statistics are kept), then its own warm-up and
          cosine decay over the remaining steps.

Both: AdamW, linear warm-up then cosine decay, gradient clipping by global norm, the NaN guard.

The encoder comes from a pretraining workdir (`init=pretrained`: the latest checkpoint or
`init_step`), the same architecture at its random initialisation (`init=random`: the weights
pretraining started from), or an exported npz / safetensors file (`init=export`,
`init_export=PATH`, `isimed.export.load`). The data set, crop size and encoder come from that
checkpoint's (or export's) stored config, as in linear evaluation.

Task `lesion` (the linear-evaluation protocol): crops with a lesion-centred share
(`task.lesion_share`), label = the crop contains lesion, binary cross-entropy; AUC. Task
`structure` (records with a structure label map: the phantom): crops centred on a random voxel of
a random structure present (classes balanced within a subject), label = the structure at the crop
centre voxel (`STRUCTURE_CLASSES`; a crop clipped at the border onto background is left out of
the loss and the metric), softmax cross-entropy; one-vs-rest macro AUC, logged as `auc`. Task
`image` (the phantom): K crops centred on random lung voxels, blind to nodules; the head reads
the mean and the max of the image's crop embeddings (`pool_image`); label = the subject has a
nodule, binary cross-entropy; AUC over images. Subjects are the
data set's own splits, which share no subject: training batches come from a nested subset of the
training split's subjects (`label_subjects`: a seeded permutation, the first n, so a smaller
fraction's subjects are inside every larger one's); every `eval_every` steps the validation
subjects' fixed crops give the validation AUC and the test subjects' the test AUC. The reported
step is the one with the best validation AUC (the earliest on ties; step 0 included, where the
zero head scores chance): the selection reads validation AUCs only, and the test AUC of that
step is reported, so no weights need to be kept for the selection. results.json holds both and
the validation curve.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metrics as clu_metrics
from clu import parameter_overview
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from isimed import checkpoints
from isimed import errors
from isimed import export
from isimed import paths
from isimed import runtime
from isimed import train
from isimed import train_state
from isimed import workdir as workdir_layout
from isimed.data import pipeline
from isimed.data import structures as structure_labels
from isimed.evaluation import context_tasks
from isimed.evaluation import features as features_lib
from isimed.evaluation import metrics as metrics_lib
from isimed.evaluation import metrics_log

MODES = ("linear", "full")
INITS = ("pretrained", "random", "export")
TASKS = ("lesion", "structure", "image")
HEAD_NORMS = ("none", "layer")
# The structure task's classes: the structure at the crop centre (background excluded), as the
# linear evaluation's anatomy task.
STRUCTURE_CLASSES = context_tasks.ANATOMY_CLASSES


def num_outputs(task: str) -> int:
    """The head's outputs: one per structure class (structure), else one logit."""
    return len(STRUCTURE_CLASSES) if task == "structure" else 1


def head_inputs(task: str, embed_dim: int) -> int:
    """The head's input size: an image's pooled crops (`pool_image`) or one crop's embedding."""
    return 2 * embed_dim if task == "image" else embed_dim


def head_input(z: jnp.ndarray, norm: str) -> jnp.ndarray:
    """What the head reads: the features, or (`norm="layer"`) each row standardised over its
    features without learned parameters. Adam moves a head's logits in proportion to the scale of
    its input, and pretraining methods leave embeddings of very different scales (ISImed's are mm
    / target_scale), so a standardised input makes the head learn at one speed for every encoder."""
    if norm == "none":
        return z
    z = z - z.mean(axis=-1, keepdims=True)
    return z / jnp.sqrt((z * z).mean(axis=-1, keepdims=True) + 1e-6)


def pool_image(z: jnp.ndarray) -> jnp.ndarray:
    """`(B, K, D)` crop embeddings -> `(B, 2D)` image features: the mean and the max over each
    image's K crops (linear evaluation's image features, `context_tasks.image_features`)."""
    return jnp.concatenate([z.mean(axis=1), z.max(axis=1)], axis=-1)


class FinetuneError(errors.UserError, ValueError):
    """A fine-tuning setting that cannot work; the message says which and what to do."""


# Subjects ---------------------------------------------------------------------------------------


def num_label_subjects(num_train: int, fraction: float | None, subjects: int | None) -> int:
    """How many training subjects carry labels: `subjects` if set, else `fraction` of them
    (rounded, at least 1)."""
    if subjects is not None:
        n = int(subjects)
        if not 1 <= n <= num_train:
            raise FinetuneError(
                f"subjects={n}: the training split has {num_train} subjects (use 1..{num_train})"
            )
        return n
    if fraction is None or not 0.0 < float(fraction) <= 1.0:
        raise FinetuneError(f"fraction={fraction}: use a share of the training subjects in (0, 1]")
    return max(1, int(round(float(fraction) * num_train)))


def label_subjects(num_train: int, n: int, seed: int) -> np.ndarray:
    """Indices (into the training split) of the `n` labelled subjects: the first `n` of a
    permutation seeded by `seed` alone, so the subjects of a smaller `n` are inside every larger
    one's. Returned sorted."""
    order = np.random.default_rng([seed, 23]).permutation(num_train)
    return np.sort(order[:n])


class _Subset:
    """The records of `source` at `indices`, as a random-access source."""

    def __init__(self, source, indices: np.ndarray):
        self._source, self._indices = source, [int(i) for i in indices]

    def __len__(self) -> int:
        return len(self._indices)

    def __getitem__(self, index: int):
        return self._source[self._indices[index]]


def split_ids(data: ml_collections.ConfigDict, split: str, indices=None) -> list[int]:
    """The subject ids (`record["id"]`) of a split (of its records at `indices`)."""
    source = pipeline.open_source(data, split)
    indices = range(len(source)) if indices is None else indices
    return [int(source[int(i)]["id"]) for i in indices]


# The encoder to start from ----------------------------------------------------------------------


def load_init(config: ml_collections.ConfigDict):
    """`(pre_config, networks, encoder_params, batch_stats, source)`: the encoder fine-tuning
    starts from (`config.init`), the pretraining config it was built with and a description."""
    if config.init not in INITS:
        raise FinetuneError(f"init={config.init!r}; use one of: {', '.join(INITS)}")
    if config.init == "export":
        if not config.get("init_export"):
            raise FinetuneError("init=export needs --config.init_export=PATH (an isimed-export npz)")
        arrays, pre_config, step = export.load(config.init_export)
        params, batch_stats = export.unflatten(arrays)
        networks = train_state.Networks(pre_config)
        params, batch_stats = (
            _as_float32_like(params, networks.params),
            _as_float32_like(batch_stats, networks.batch_stats),
        )
        return pre_config, networks, params, batch_stats, f"export {config.init_export} (step {step})"
    if not config.get("pretrain_workdir"):
        raise FinetuneError("set --config.pretrain_workdir to a pretraining --workdir")
    pretrain_workdir = os.fspath(paths.resolve(config.pretrain_workdir))
    pre_config, networks, state = checkpoints.load_encoder(pretrain_workdir, config.get("init_step"))
    if config.init == "random":
        return pre_config, networks, networks.params, networks.batch_stats, "random init"
    step = int(state["step"])
    return (
        pre_config,
        networks,
        state["params"]["encoder"],
        state["batch_stats"],
        f"{pretrain_workdir} step {step}",
    )


def _as_float32_like(tree, like):
    """`tree` (loaded arrays) with the structure of `like`; ValueError naming a mismatch."""
    if jax.tree.structure(tree) != jax.tree.structure(like):
        raise FinetuneError("the exported arrays do not match the encoder their config describes")
    return jax.tree.map(lambda x, y: jnp.asarray(x, y.dtype), tree, like)


# Optimiser, state and step ----------------------------------------------------------------------


def _cosine(peak: float, warmup: int, steps: int) -> optax.Schedule:
    return optax.warmup_cosine_decay_schedule(0.0, peak, warmup, max(steps, warmup + 1))


def make_optimizer(config: ml_collections.ConfigDict):
    """`(tx, head_schedule, encoder_schedule)`. Linear mode: the head's AdamW only (the encoder
    has no optimiser state). Full mode: the encoder's AdamW at `encoder_lr_mult` times the rate,
    0 for the first `head_only_steps`, then its own warm-up and cosine decay."""
    ft = config.finetune
    total = config.total_steps
    head = _cosine(ft.learning_rate, ft.warmup_steps, total)
    clip = optax.clip_by_global_norm(ft.grad_clip)
    if config.mode == "linear":
        return optax.chain(clip, optax.adamw(head, weight_decay=ft.weight_decay)), head, None
    late = _cosine(ft.learning_rate * ft.encoder_lr_mult, ft.warmup_steps, total - ft.head_only_steps)

    def encoder(step):
        return jnp.where(step < ft.head_only_steps, 0.0, late(jnp.maximum(step - ft.head_only_steps, 0)))

    tx = optax.chain(
        clip,
        optax.multi_transform(
            {
                "head": optax.adamw(head, weight_decay=ft.weight_decay),
                "encoder": optax.adamw(encoder, weight_decay=ft.weight_decay),
            },
            {"head": "head", "encoder": "encoder"},
        ),
    )
    return tx, head, encoder


def init_head(embed_dim: int, outputs: int = 1) -> dict[str, jnp.ndarray]:
    """The zero-initialised linear head: `outputs` logits from the embedding."""
    return {
        "kernel": jnp.zeros((embed_dim, outputs), jnp.float32),
        "bias": jnp.zeros((outputs,), jnp.float32),
    }


def _trainable(config, params):
    return {"head": params["head"]} if config.mode == "linear" else params


_Metrics = clu_metrics.Collection.create(
    **{
        name: clu_metrics.Average.from_output(name) for name in ("loss", "accuracy", "grad_norm", "nonfinite")
    },
    learning_rate=clu_metrics.LastValue.from_output("learning_rate"),
)


def make_step(config: ml_collections.ConfigDict, networks: train_state.Networks, tx, schedule):
    """The pure step `(state, batch) -> (state, metrics)`: the task's loss (`task_loss`) of the
    head's logits against the crops' `label`."""
    window = config.data.get("window")
    linear = config.mode == "linear"
    head_only = 0 if linear else config.finetune.head_only_steps

    def loss_fn(trainable, frozen, batch_stats, batch):
        params = {**frozen, **trainable}
        crops = train_state.unit_crops(batch["crops"], window)
        x = crops.reshape(crops.shape[0] * crops.shape[1], *crops.shape[2:])
        z, new_stats = networks.apply(params["encoder"], batch_stats, x, train=not linear)
        if config.task.name == "image":  # One prediction per image from its K crops.
            z = pool_image(z.reshape(crops.shape[0], crops.shape[1], -1))
        z = head_input(z, config.finetune.head_norm)
        logits = z @ params["head"]["kernel"] + params["head"]["bias"]
        loss, accuracy = task_loss(config.task.name, logits, batch["label"].reshape(-1))
        return loss, (accuracy, new_stats)

    def step(state, batch):
        trainable = _trainable(config, state["params"])
        frozen = {k: v for k, v in state["params"].items() if k not in trainable}
        (loss, (accuracy, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, frozen, state["batch_stats"], batch
        )
        updates, opt_state = tx.update(grads, state["opt_state"], trainable)
        grad_norm = optax.tree.norm(grads)
        if linear:
            batch_stats = state["batch_stats"]  # Eval mode: the running statistics stay.
        elif head_only:
            early = state["step"] < head_only  # Head only: the statistics stay too.
            batch_stats = jax.tree.map(
                lambda new, old: jnp.where(early, old, new), batch_stats, state["batch_stats"]
            )
        candidate = {
            "params": {**frozen, **optax.apply_updates(trainable, updates)},
            "batch_stats": batch_stats,
            "opt_state": opt_state,
        }
        new_state, finite = train_state.keep_if_finite(candidate, state, loss, grad_norm)
        if linear:
            # Not even through `where`: the frozen encoder leaves as it came, bit for bit.
            new_state["params"]["encoder"] = state["params"]["encoder"]
            new_state["batch_stats"] = state["batch_stats"]
        metrics = _Metrics.single_from_model_output(
            loss=loss,
            accuracy=accuracy,
            grad_norm=grad_norm,
            nonfinite=1.0 - finite.astype(jnp.float32),
            learning_rate=schedule(state["step"]),
        )
        return new_state, metrics

    return step


def task_loss(task: str, logits: jnp.ndarray, y: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(loss, accuracy)` of `(N, outputs)` logits against labels `(N,)`: binary cross-entropy
    (lesion, image: y 0/1), or softmax cross-entropy over the crops with a class (structure:
    y >= 0)."""
    if task != "structure":
        y = y.astype(jnp.float32)
        loss = optax.sigmoid_binary_cross_entropy(logits[:, 0], y).mean()
        return loss, jnp.mean((logits[:, 0] > 0) == (y > 0.5))
    valid = (y >= 0).astype(jnp.float32)
    n = jnp.maximum(valid.sum(), 1.0)
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(y, 0))
    return (ce * valid).sum() / n, ((logits.argmax(-1) == y) * valid).sum() / n


@dataclasses.dataclass(frozen=True)
class _PhantomCrops(grain.transforms.RandomMap):
    """K crops per record of a task that reads the structure label map (`_starts_and_label`),
    with the task's `label` and the crops' `starts`."""

    crop_shape: tuple[int, ...]
    num_crops: int
    window: tuple[float, float] | None
    widen: bool = True
    task = ""

    def random_map(self, record, rng: np.random.Generator) -> dict[str, np.ndarray]:
        if not context_tasks.has_structures(record):
            raise FinetuneError(
                f"{pipeline.record_name(record)}: task.name={self.task!r} needs records with a "
                "structure label map and a lesion mask (the chest phantom's 3D variants)"
            )
        starts, label = self._starts_and_label(record, rng)
        out = pipeline.crops_at(record, starts, self.crop_shape, self.window, labels=False, widen=self.widen)
        out["label"] = label
        out["starts"] = starts
        return out

    def _starts_and_label(self, record, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        raise NotImplementedError


class StructureCrops(_PhantomCrops):
    """Crops each centred on a random voxel of a random structure present (`STRUCTURE_CLASSES`);
    `label`: the structure at the crop's centre voxel (its class index, -1 for background where
    clipping at the border moved the centre)."""

    task = "structure"

    def _starts_and_label(self, record, rng):
        labels = np.asarray(record["structures"])
        flat = labels.reshape(-1)
        present = [
            (c, np.flatnonzero(flat == structure_labels.STRUCTURES[name]))
            for c, name in enumerate(STRUCTURE_CLASSES)
        ]
        present = [(c, where) for c, where in present if where.size]
        picks = rng.integers(len(present), size=self.num_crops)
        voxels = np.stack(
            [np.unravel_index(present[i][1][rng.integers(present[i][1].size)], labels.shape) for i in picks]
        )
        crop = np.asarray(self.crop_shape)
        starts = np.clip(voxels - (crop - 1) // 2, 0, np.asarray(labels.shape) - crop).astype(np.int64)
        lookup = np.full(256, -1, np.int64)
        for c, name in enumerate(STRUCTURE_CLASSES):
            lookup[structure_labels.STRUCTURES[name]] = c
        centre = labels[tuple(context_tasks.centre_voxels(starts, self.crop_shape).T)]
        return starts, lookup[centre].astype(np.int32)


class ImageCrops(_PhantomCrops):
    """Crops centred on random lung voxels, blind to nodules (linear evaluation's image task,
    `context_tasks.task_starts`); `label` `(1,)`: the subject has a nodule."""

    task = "image"

    def _starts_and_label(self, record, rng):
        sampling = context_tasks.Sampling(self.crop_shape, self.window, image=self.num_crops)
        starts = context_tasks.task_starts(record, sampling, rng, tasks=("image",))["image"]
        if len(starts) != self.num_crops:
            raise FinetuneError(f"{pipeline.record_name(record)}: no lung voxels to centre crops on")
        return starts, np.array([np.any(np.asarray(record["mask"]) > 0)], np.int32)


def make_sampler(config: ml_collections.ConfigDict, crops_per_image: int, *, train: bool):
    """The task's crop sampler for `pipeline.make_dataset` (None: its lesion-share sampler)."""
    if config.task.name == "lesion":
        return None
    window = config.data.get("window")
    kind = StructureCrops if config.task.name == "structure" else ImageCrops
    return kind(
        tuple(config.data.crop_size),
        crops_per_image,
        None if window is None else tuple(window),
        widen=not train,
    )


def _labels(config, element) -> np.ndarray:
    return np.asarray(element["has_lesion"] if config.task.name == "lesion" else element["label"])


# Held-out crops ---------------------------------------------------------------------------------


def fixed_crops(config: ml_collections.ConfigDict, split: str) -> dict[str, np.ndarray]:
    """The fixed evaluation crops of a split's first `task.max_images` subjects (the same crops
    every call): crops `(N, *crop, 1)` float32, label `(N,)` (`task_loss`; the image task: its
    image's label on each of its crops), image_id `(N,)`."""
    task = config.task
    ds = pipeline.make_dataset(
        config.data,
        split,
        seed=config.seed + 17,
        train=False,
        batch_size=1,
        crops_per_image=task.eval_crops_per_image,
        lesion_share=task.lesion_share,
        sampler=make_sampler(config, task.eval_crops_per_image, train=False),
    )
    parts: dict[str, list[np.ndarray]] = {"crops": [], "label": [], "image_id": []}
    for n, element in enumerate(ds):
        if n >= task.max_images:
            break
        parts["crops"].append(element["crops"][0])
        k = element["crops"].shape[1]
        parts["label"].append(np.broadcast_to(_labels(config, element)[0], (k,)))
        parts["image_id"].append(np.full(k, int(np.asarray(element["image_id"]).reshape(-1)[0])))
    if not parts["crops"]:
        raise FinetuneError(f"split {split!r} of {config.data.name} has no images")
    return {key: np.concatenate(value) for key, value in parts.items()}


def make_scorer(
    task: str, networks: train_state.Networks, mesh, *, frozen: bool = False, head_norm: str = "none"
):
    """`(state, held, name) -> {"auc", "loss"}` of the head's logits on the fixed crops `held`
    (eval-mode encoder): the lesion AUC, the image task's AUC over images (each image's crops
    pooled, `pool_image`), or the structure classes' one-vs-rest macro AUC. With
    `frozen` (linear mode: the encoder never changes) each `name`'s embeddings are computed once."""
    bind = features_lib.make_embed_fn(networks, mesh)
    cache: dict[str, np.ndarray] = {}

    def score(state, held: dict[str, np.ndarray], name: str) -> dict[str, float]:
        z = cache.get(name) if frozen else None
        if z is None:
            z = bind(state["params"]["encoder"], state["batch_stats"])(held["crops"])
            if frozen:
                cache[name] = z
        y = held["label"]
        if task == "image":  # `fixed_crops` keeps each image's crops together, as many each.
            images = len(np.unique(held["image_id"]))
            z = np.asarray(pool_image(z.reshape(images, len(z) // images, -1)))
            y = y.reshape(images, -1)[:, 0]
        z = np.asarray(head_input(jnp.asarray(z), head_norm))
        head = jax.device_get(state["params"]["head"])
        logits = (z @ np.asarray(head["kernel"]) + np.asarray(head["bias"])).astype(np.float64)
        loss = float(task_loss(task, jnp.asarray(logits, jnp.float32), jnp.asarray(y))[0])
        if task != "structure":
            auc = metrics_lib.binary_metrics(y, 1 / (1 + np.exp(-logits[:, 0])))["auc"]
        else:
            valid = y >= 0
            prob = np.exp(logits - logits.max(-1, keepdims=True))
            prob /= prob.sum(-1, keepdims=True)
            onehot = np.eye(logits.shape[1])[y[valid]]
            auc = metrics_lib.multiclass_metrics(onehot, prob[valid])["macro_auc"]
        return {"auc": auc, "loss": loss}

    return score


# The job ----------------------------------------------------------------------------------------


def resolve_config(config: ml_collections.ConfigDict):
    """The run's config: `config` plus the pretraining config's `data` and `model` (data dir
    override and phantom path resolved), and what the encoder is built from."""
    choices = (
        ("mode", config.mode, MODES),
        ("task.name", config.task.name, TASKS),
        ("finetune.head_norm", config.finetune.head_norm, HEAD_NORMS),
    )
    for key, value, allowed in choices:
        if value not in allowed:
            raise FinetuneError(f"{key}={value!r}; use one of: {', '.join(allowed)}")
    pre_config, networks, params, batch_stats, source = load_init(config)
    config = ml_collections.ConfigDict(config.to_dict())
    data = ml_collections.ConfigDict(pre_config.data.to_dict())
    if config.get("data_dir"):
        data["dir" if data.name == "prepared" else "tfds_dir"] = config.data_dir
    if data.name == "chest_phantom":
        data.tfds_dir = os.fspath(paths.resolve(data.tfds_dir))
    data.images_per_batch = config.task.images_per_batch
    data.crops_per_image = config.task.crops_per_image
    config.data = data
    config.model = ml_collections.ConfigDict(pre_config.model.to_dict())
    ft = config.finetune
    if config.mode == "full" and not 0 <= ft.head_only_steps < config.total_steps:
        raise FinetuneError(
            f"finetune.head_only_steps={ft.head_only_steps} must be in [0, total_steps={config.total_steps})"
        )
    return config, pre_config, networks, params, batch_stats, source


def make_job(config: ml_collections.ConfigDict, workdir: workdir_layout.Workdir) -> train.Job:
    """The fine-tuning `train.Job` for `config` (a fine-tuning config, `configs/finetune_chest.py`)."""
    del workdir
    config, pre_config, networks, params, batch_stats, source = resolve_config(config)
    pipeline.check_crops_fit(config.data, ("train", "validation", "test"))
    mesh = runtime.make_mesh()
    if config.data.images_per_batch % mesh.devices.size:
        raise FinetuneError(
            f"task.images_per_batch={config.data.images_per_batch} must be divisible by the "
            f"{mesh.devices.size} devices (the batch is sharded by image)"
        )
    replicated, data_sharding = NamedSharding(mesh, P()), NamedSharding(mesh, P("data"))

    # Labelled training subjects, and the batches of their crops.
    train_source = pipeline.open_source(config.data, "train")
    n = num_label_subjects(len(train_source), config.get("fraction"), config.get("subjects"))
    chosen = label_subjects(len(train_source), n, config.split_seed)
    if n < jax.process_count():  # Each process reads its own labelled subjects (`make_dataset`).
        raise FinetuneError(
            f"{n} labelled subject(s) cannot be shared by {jax.process_count()} processes; "
            "label more subjects or run on fewer processes"
        )
    train_ds = pipeline.make_dataset(
        config.data,
        "train",
        seed=config.seed,
        train=True,
        lesion_share=config.task.lesion_share,
        labels=True,
        sampler=make_sampler(config, config.data.crops_per_image, train=True),
        process_index=jax.process_index(),
        process_count=jax.process_count(),
        source=_Subset(train_source, chosen),
    )
    data_iter = iter(train_ds)

    def next_batch():
        batch = next(data_iter)
        return {
            k: jax.make_array_from_process_local_data(data_sharding, v)
            for k, v in (("crops", np.asarray(batch["crops"])), ("label", _labels(config, batch)))
        }

    tx, schedule, _ = make_optimizer(config)
    task = config.task.name
    head = init_head(head_inputs(task, config.model.embed_dim), num_outputs(task))
    all_params = {"encoder": params, "head": head}
    state = {
        "step": jnp.zeros((), jnp.int32),
        "params": all_params,
        "batch_stats": batch_stats,
        "opt_state": tx.init(_trainable(config, all_params)),
    }
    state = jax.device_put(state, replicated)
    step = jax.jit(
        make_step(config, networks, tx, schedule),
        in_shardings=(replicated, data_sharding),
        out_shardings=(replicated, replicated),
        donate_argnums=0,
    )

    held = {split: fixed_crops(config, split) for split in ("validation", "test")}
    score = make_scorer(
        config.task.name, networks, mesh, frozen=config.mode == "linear", head_norm=config.finetune.head_norm
    )

    def validate(step_: int, state_) -> dict[str, dict[str, float]]:
        del step_
        return {split: score(state_, crops, split) for split, crops in held.items()}

    info = {
        "init": config.init,
        "encoder_from": source,
        "train_subjects": int(n),
        "train_subjects_available": len(train_source),
        "train_subject_ids": split_ids(config.data, "train", chosen),
        "validation_subjects": len(np.unique(held["validation"]["image_id"])),
        "test_subjects": len(np.unique(held["test"]["image_id"])),
    }

    def finish(run: train._Run, state_, summary: dict[str, Any]) -> dict[str, Any]:
        del summary
        run.writer.close()  # Flushes metrics.jsonl, which holds the curves.
        if jax.process_index() != 0:  # Only process 0 writes metrics.jsonl.
            return {"final_step": int(state_["step"])}
        results = _results(config, run.workdir, int(state_["step"]), info)
        (run.workdir / "results.json").write_text(json.dumps(results, indent=2))
        return results

    count = parameter_overview.count_parameters(params)
    logging.info("fine-tuning %s from %s", config.mode, source)
    return train.Job(
        config=config,
        mesh=mesh,
        state=state,
        step=step,
        data_iter=data_iter,
        next_batch=next_batch,
        validate=validate,
        finish=finish,
        crops_per_step=config.data.images_per_batch * config.data.crops_per_image,
        description=(
            f"fine-tuning ({config.mode}, {config.task.name}) encoder {config.model.name}: {count:,} "
            f"parameters from {source}; {n} of {len(train_source)} training subjects labelled"
        ),
    )


def select_step(curve: list[tuple[int, float]]) -> tuple[int, float]:
    """The step of the best validation AUC (the earliest on ties; nan never wins) and its AUC."""
    finite = [(s, a) for s, a in curve if not math.isnan(a)]
    if not finite:
        raise FinetuneError("no finite validation AUC (does the validation split hold both classes?)")
    best = max(a for _, a in finite)
    return next((s, a) for s, a in sorted(finite) if a == best)


def _results(config, workdir: workdir_layout.Workdir, final_step: int, info: dict) -> dict[str, Any]:
    """results.json: the selected step (validation AUC only), its test AUC and the curves."""
    rows: dict[int, dict[str, float]] = {}
    for _, row in metrics_log.read_rows(workdir.metrics):
        rows.setdefault(int(row["step"]), {}).update(row)
    curve = [(s, r["validation/auc"]) for s, r in sorted(rows.items()) if "validation/auc" in r]
    step, val_auc = select_step(curve)
    return {
        "task": {"lesion": "lesion_crop", "structure": "structure_at_centre", "image": "nodule_image"}[
            config.task.name
        ],
        "metric": "macro_auc (one-vs-rest)" if config.task.name == "structure" else "auc",
        "mode": config.mode,
        "fraction": config.get("fraction"),
        "subjects": config.get("subjects"),
        "seed": config.seed,
        "split_seed": config.split_seed,
        **info,
        "final_step": final_step,
        "selected_step": step,
        "validation_auc": val_auc,
        "test_auc": rows[step]["test/auc"],
        "validation_curve": [[s, a] for s, a in curve],
    }


def finetune(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
    """Fine-tunes (resuming from `workdir` if it holds a checkpoint) and returns results.json's
    content (on processes other than 0, which write nothing: `{"final_step": N}`), or
    `{"preempted_at_step": N}` after a SIGTERM / Ctrl-C (rerun to resume)."""
    runtime.initialize(config)
    return train.run_job(config, workdir, make_job)


def default_workdir(config: ml_collections.ConfigDict) -> str:
    """`<pretrain_workdir>/finetune_<mode>_<fraction or Nsubjects>[_random]` (`Workdir.finetune`)."""
    if not config.get("pretrain_workdir"):
        raise FinetuneError("pass --workdir (there is no --config.pretrain_workdir to put it under)")
    return os.fspath(workdir_layout.Workdir(config.pretrain_workdir).finetune(run_name(config)))


def run_name(config: ml_collections.ConfigDict) -> str:
    amount = f"{config.subjects}subjects" if config.get("subjects") else f"{config.fraction:g}"
    task = "" if config.task.name == "lesion" else f"{config.task.name}_"
    return f"{task}{config.mode}_{amount}" + ("" if config.init == "pretrained" else f"_{config.init}")


def format_results(results: dict[str, Any]) -> str:
    if "preempted_at_step" in results:
        return f"Preempted: checkpoint saved at step {results['preempted_at_step']}; rerun to resume."
    if "task" not in results:  # A process other than 0 (`finish`): process 0 writes results.json.
        return f"Fine-tuning finished at step {results['final_step']}; process 0 writes results.json."
    r = results
    return (
        f"Fine-tuning ({r['task']}, {r['mode']}, {r['init']}) with {r['train_subjects']} of "
        f"{r['train_subjects_available']} training subjects labelled:\n"
        f"  selected step {r['selected_step']} (best validation {r['metric']} {r['validation_auc']:.3f} "
        f"on {r['validation_subjects']} subjects)\n"
        f"  test {r['metric']} {r['test_auc']:.3f} on {r['test_subjects']} held-out subjects"
    )
