"""Fine-tuning a pretrained encoder with few labels on the synthetic chest phantom (`isimed.finetune`).

python finetune.py --config=configs/finetune_chest.py:demo,mode=linear,fraction=0.1 \
    --config.pretrain_workdir=workdirs/isimed_chest_demo [--workdir=DIR]

The config argument is comma-separated tokens, in any order:
  PRESET              paper (the default), demo or test
  mode=linear|full    frozen encoder + linear head, or the whole network (encoder at
                      finetune.encoder_lr_mult times the head's learning rate)
  init=pretrained|random|export
                      the pretraining workdir's encoder (latest step, or --config.init_step=N),
                      the same architecture at its random initialisation, or an isimed-export
                      file (--config.init_export=PATH)
  task=lesion|structure|image
                      crop lesion classification (the linear-evaluation protocol, the default),
                      the structure at the crop centre, or whether the subject has a nodule
                      from crops of its lungs (the last two: records with structure label maps)
  fraction=F          the share of training subjects labelled (0 < F <= 1; default 0.1)
  subjects=N          N training subjects labelled instead of a fraction

The data set, crop size and encoder come from the pretraining checkpoint's stored config (as in
linear evaluation). DIR defaults to `<pretrain_workdir>/finetune_<mode>_<fraction>[_<init>]`.
"""

import ml_collections

from configs import common

PRESETS = ("paper", "demo", "test")
_KEYS = {
    "mode": ("linear", "full"),
    "init": ("pretrained", "random", "export"),
    "task": ("lesion", "structure", "image"),
}
DEFAULTS = {"preset": "paper", "mode": "linear", "init": "pretrained", "task": "lesion", "fraction": 0.1}


def parse_arg(arg: str | None) -> dict:
    """`{"preset", "mode", "init", "task", "fraction", "subjects"}` from the config argument."""
    values: dict = {}
    bad = f"config argument {arg!r}: "
    for key, value in common.arg_tokens(arg).items():
        if key == "preset" and value not in PRESETS:
            raise ValueError(bad + f"unknown preset {value!r}; use one of: {', '.join(PRESETS)}")
        if key in _KEYS and value not in _KEYS[key]:
            raise ValueError(bad + f"{key} must be one of {', '.join(_KEYS[key])}, got {value!r}")
        if key == "fraction":
            value = float(value)
            if not 0.0 < value <= 1.0:
                raise ValueError(bad + f"fraction must be in (0, 1], got {value}")
        elif key == "subjects":
            value = int(value)
            if value < 1:
                raise ValueError(bad + f"subjects must be 1 or more, got {value}")
        elif key not in ("preset", *_KEYS):
            raise ValueError(bad + f"unknown key {key!r}; keys: mode, init, task, fraction, subjects")
        values[key] = value
    return {**DEFAULTS, "subjects": None, **values}


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    a = parse_arg(arg)
    p = a["preset"]
    c = ml_collections.ConfigDict()
    c.pretrain_workdir = ml_collections.config_dict.placeholder(str)
    c.init = a["init"]
    c.init_step = ml_collections.config_dict.placeholder(int)  # None: the latest checkpoint.
    c.init_export = ml_collections.config_dict.placeholder(str)  # init=export: an isimed-export file.
    c.mode = a["mode"]
    c.fraction = a["fraction"]
    c.subjects = ml_collections.config_dict.placeholder(int)  # Set: this many subjects, not a fraction.
    c.subjects = a["subjects"]
    c.split_seed = 0  # The permutation of training subjects the labelled ones are the first n of.
    c.seed = 0  # Crop sampling and batch order.
    common.distributed(c)
    c.data_dir = ml_collections.config_dict.placeholder(str)  # Overrides the pretraining data dir.

    # lesion: crop lesion classification, the linear-evaluation protocol: K crops per subject, a
    # share of them centred on lesion voxels; label = the crop contains lesion. structure: K crops
    # per subject centred on random structures; label = the structure at the crop centre. image: K
    # crops per subject centred on random lung voxels, pooled; label = the subject has a nodule.
    c.task = ml_collections.ConfigDict()
    c.task.name = a["task"]
    c.task.lesion_share = 0.39
    c.task.images_per_batch = {"paper": 32, "demo": 8, "test": 4}[p]
    c.task.crops_per_image = {"paper": 32, "demo": 16, "test": 8}[p]
    c.task.eval_crops_per_image = {"paper": 64, "demo": 32, "test": 16}[p]
    c.task.max_images = 1000  # Validation and test subjects evaluated (the first ones of each split).

    c.finetune = ml_collections.ConfigDict()
    c.finetune.learning_rate = {"paper": 1e-3, "demo": 3e-3, "test": 1e-2}[p]
    c.finetune.encoder_lr_mult = 0.1  # full mode: the encoder's rate, relative to the head's.
    c.finetune.head_only_steps = 0  # full mode: steps that train the head alone first.
    c.finetune.warmup_steps = {"paper": 200, "demo": 20, "test": 5}[p]
    c.finetune.weight_decay = 1e-4
    c.finetune.grad_clip = 2.0
    # The head's input: the embedding as it is ("none"), or each row standardised over its
    # features without parameters ("layer": the head then learns at one speed whatever the
    # encoder's embedding scale).
    c.finetune.head_norm = "none"

    c.total_steps = {"paper": 5000, "demo": 300, "test": 60}[p]
    c.log_every = {"paper": 50, "demo": 25, "test": 10}[p]
    c.eval_every = {"paper": 250, "demo": 50, "test": 20}[p]  # Validation (the selection) and test AUC.
    c.checkpoint_every = c.eval_every
    c.keep_checkpoints = 2
    c.profile_steps = ()
    c.wandb = ml_collections.ConfigDict()
    c.wandb.project = ml_collections.config_dict.placeholder(str)
    c.wandb.entity = ml_collections.config_dict.placeholder(str)
    c.wandb.name = ml_collections.config_dict.placeholder(str)
    c.wandb.mode = ml_collections.config_dict.placeholder(str)
    return c
