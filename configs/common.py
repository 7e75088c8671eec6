"""What every config shares: the config argument, and the training, phantom-data and
prepared-data settings per preset. A data-set config (`configs/isimed_<data>.py`) composes these
with a method (`isimed.methods.configure`), so a method's defaults live with the method, not here.

The config argument (`--config=FILE:ARG`, `parse_arg`) is comma-separated tokens, in any order:
  PRESET          a bare token: paper (the default), demo, demo2d (phantom only) or test
  method=METHOD   isimed (the default), simclr, vicreg, barlow or isimed_vicreg
  head=true       ISImed's loss on a projection head's output (`methods.ISIMED_HEAD`), false the
                  default; only with method=isimed (the other methods always have their head)
e.g. `configs/isimed_chest.py:demo,method=simclr` or `configs/isimed_brats.py:method=vicreg`.

Presets:
  paper   paper scale: 3D DenseNet-121, 32^3 crops, 1024 crops per step, bf16 (accelerators).
  demo    a few minutes on 2 CPU cores: small 3D CNN, 16^3 crops.
  demo2d  the same on 2D images, 16^2 crops.
  test    seconds: tiny images, few steps (the test suite).
"""

from __future__ import annotations

import dataclasses

import ml_collections

from isimed import methods

PRESETS = ("paper", "demo", "demo2d", "test")
_BOOLS = {"true": True, "false": False}


@dataclasses.dataclass(frozen=True)
class Arg:
    """A parsed config argument (`parse_arg`)."""

    preset: str = "paper"
    method: str = "isimed"
    head: bool = False


def arg_tokens(arg: str | None) -> dict[str, str]:
    """`--config=FILE:ARG` split into `{key: value}`: comma-separated tokens, `key=value` or a bare
    token (the preset); ValueError for a key given twice. Every config's `parse_arg` reads these."""
    values: dict[str, str] = {}
    for token in (arg or "").split(","):
        token = token.strip()
        if not token:
            continue
        key, eq, value = token.partition("=")
        if not eq:
            key, value = "preset", token
        if key in values:
            raise ValueError(f"config argument {arg!r}: {key} given twice")
        values[key] = value
    return values


def parse_arg(arg: str | None, allowed: tuple[str, ...] = PRESETS) -> Arg:
    """Parses `--config=FILE:ARG` (module docstring); ValueError naming the bad token otherwise."""
    values: dict = {}
    for key, value in arg_tokens(arg).items():
        if key == "preset" and value not in allowed:
            raise ValueError(
                f"config argument {arg!r}: unknown preset {value!r}; use one of: {', '.join(allowed)}"
            )
        elif key == "method" and value not in methods.METHODS:
            raise ValueError(
                f"config argument {arg!r}: unknown method {value!r}; use one of: {', '.join(methods.METHODS)}"
            )
        elif key == "head":
            if value not in _BOOLS:
                raise ValueError(f"config argument {arg!r}: head must be true or false, got {value!r}")
            value = _BOOLS[value]
        elif key not in ("preset", "method"):
            raise ValueError(f"config argument {arg!r}: unknown key {key!r}; keys: method, head")
        values[key] = value
    parsed = Arg(**values)
    if parsed.head and methods.get(parsed.method).head_dims is not None:
        raise ValueError(
            f"config argument {arg!r}: head=true is for method=isimed ({parsed.method} has its own head)"
        )
    return parsed


def preset(arg: str | None, allowed: tuple[str, ...] = PRESETS) -> str:
    """The preset of a config argument that takes nothing else (the linear-evaluation configs)."""
    parsed = parse_arg(arg, allowed)
    if parsed != Arg(preset=parsed.preset):
        raise ValueError(f"config argument {arg!r}: this config takes a preset only")
    return parsed.preset


def _cpu(preset_name: str) -> str:
    """demo2d trains like demo."""
    return "demo" if preset_name == "demo2d" else preset_name


def sampling(preset_name: str) -> ml_collections.ConfigDict:
    """Crop sampling and input-pipeline settings every data set shares."""
    p = _cpu(preset_name)
    crop = {"paper": (32, 32, 32), "demo": (16, 16, 16), "test": (8, 8, 8)}[p]
    d = ml_collections.ConfigDict()
    d.crop_size = crop[:2] if preset_name == "demo2d" else crop
    d.crops_per_image = {"paper": 32, "demo": 16, "test": 8}[p]  # Through the encoder per image.
    d.images_per_batch = {"paper": 32, "demo": 8, "test": 4}[p]  # paper: 32 x 32 = 1024 crops.
    d.min_foreground = 0.5  # Crops hold at least this share of voxels inside the body.
    # Two-view methods (SimCLR, VICReg, Barlow): the second crop is shifted by up to this share of
    # the crop size per axis.
    d.view_offset = 0.25
    # Pretraining crops rotated about their centres by up to this many degrees per axis (0: off).
    d.rotate_deg = 0.0
    # Read threads. On 2 cores one keeps the demo's step fed (end to end 89-97% of the step-only
    # rate over six runs, against 83-90% with two, which contend with XLA's threads and each other).
    d.num_threads = {"paper": 8, "demo": 1, "test": 1}[p]
    d.prefetch = 4
    d.num_workers = {"paper": 4, "demo": 0, "test": 0}[p]
    # Decoded volumes kept in memory per process (least recently used out first); 0: none. Worth
    # it when the split, or most of it, fits.
    d.cache_mb = 0
    return d


def phantom_data(preset_name: str) -> ml_collections.ConfigDict:
    """The synthetic chest phantom, generated into `tfds_dir` on first use."""
    d = sampling(preset_name)
    d.name = "chest_phantom"
    d.variant = {"paper": "large3d", "demo": "demo3d", "demo2d": "demo2d", "test": "tiny3d"}[preset_name]
    d.tfds_dir = "~/tensorflow_datasets"  # Where TFDS keeps the generated phantom.
    # Phantom subjects share one world frame up to small pose changes.
    d.shared_frame = True
    d.cache_mb = 2048  # The demo and test phantoms fit whole: each volume is decoded once.
    d.window = (-1000.0, 1000.0)  # CT HU window -> [-1, 1].
    d.foreground_threshold = -900.0  # HU; air outside the body is about -1000.
    return d


def prepared_data(preset_name: str) -> ml_collections.ConfigDict:
    """A folder written by `python -m isimed.data.prepare` (intensities already in [-1, 1])."""
    d = sampling(preset_name)
    d.name = "prepared"
    d.dir = ml_collections.config_dict.placeholder(str)  # Required: the prepare --out folder.
    # Whether the subjects share one world frame (registered to an atlas): then distances between
    # crops of different subjects mean something, and the loss and evaluation use them
    # (`isimed.methods.loss_config`, `isimed.evaluation.held_out`). Scans in their own scanner
    # frames do not; set True only for registered data.
    d.shared_frame = False
    # Normalised units: -0.9 is -900 HU under the CT window [-1000, 1000]; crops must be at least
    # half inside the body. MRI and radiograph configs override this.
    d.foreground_threshold = -0.9
    return d


def distributed(c: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """Runtime fields. Multi-host: `distributed=True` calls jax.distributed.initialize(), which
    detects Cloud TPU, SLURM, Open MPI and Kubernetes launches; for a manual launch also set the
    other three (None: detected). Compiled programs are cached across runs in
    `compilation_cache_dir` (None: no cache)."""
    c.compilation_cache_dir = "~/.cache/isimed/jax"
    c.distributed = False
    c.coordinator_address = ml_collections.config_dict.placeholder(str)  # "host:port" of process 0.
    c.num_processes = ml_collections.config_dict.placeholder(int)
    c.process_id = ml_collections.config_dict.placeholder(int)
    return c


def pretraining(arg: Arg, data: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A whole pretraining config: `data`, the preset's encoder, optimiser, schedule and
    evaluation, and the method's loss, head and views (`arg`: the parsed config argument)."""
    preset_name = arg.preset
    p = _cpu(preset_name)
    c = ml_collections.ConfigDict()
    c.seed = 0
    distributed(c)
    c.data = data

    c.model = ml_collections.ConfigDict()
    c.model.name = {"paper": "densenet121", "demo": "small_cnn", "test": "small_cnn"}[p]
    c.model.embed_dim = {"paper": 1024, "demo": 128, "test": 32}[p]
    c.model.dtype = {"paper": "bfloat16", "demo": "float32", "test": "float32"}[p]

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = {"paper": 1e-3, "demo": 3e-3, "test": 3e-3}[p]
    c.optim.weight_decay = 1e-2
    c.optim.schedule = "cosine"  # or "exponential" (the reference: x decay_rate per decay_steps)
    c.optim.warmup_steps = {"paper": 500, "demo": 50, "test": 5}[p]
    c.optim.decay_rate = 0.9
    c.optim.decay_steps = 1000
    c.optim.grad_clip = 2.0

    c.total_steps = {"paper": 20_000, "demo": 800, "demo2d": 400, "test": 150}[preset_name]
    c.log_every = {"paper": 50, "demo": 50, "test": 10}[p]
    c.eval_every = {"paper": 1000, "demo": 200, "test": 50}[p]
    c.checkpoint_every = c.eval_every
    c.keep_checkpoints = 3
    # (first, last): a jax.profiler trace of these steps into WORKDIR/profile (TensorBoard's
    # profile plugin reads it); () for none.
    c.profile_steps = ()

    # Weights & Biases (pip install -e '.[tracking]'): off unless a project is set, e.g.
    # --config.wandb.project=isimed --config.wandb.mode=offline (no account or network needed).
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ml_collections.config_dict.placeholder(str)
    c.wandb.entity = ml_collections.config_dict.placeholder(str)  # None: the account's default.
    c.wandb.name = ml_collections.config_dict.placeholder(str)  # None: the workdir's name.
    c.wandb.mode = ml_collections.config_dict.placeholder(str)  # None: WANDB_MODE, else online.

    # Held-out evaluation: fixed crops of validation (during training) and test (at the end) subjects.
    c.eval = ml_collections.ConfigDict()
    c.eval.crops_per_image = {"paper": 32, "demo": 32, "test": 16}[p]
    c.eval.max_images = {"paper": 32, "demo": 16, "test": 4}[p]
    c.eval.probe_train_images = {"paper": 64, "demo": 32, "test": 8}[p]  # For the position probe.
    return methods.configure(c, arg.method, preset_name, head=arg.head)
