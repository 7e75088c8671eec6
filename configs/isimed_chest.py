"""ISImed pretraining on the synthetic chest phantom.

Presets (`--config=configs/isimed_chest.py:PRESET`):
  (none)  paper scale: 3D DenseNet-121, 32^3 crops, 1024 crops per step, bf16 compute (accelerators).
  demo    a few minutes on 2 CPU cores: small 3D CNN, 16^3 crops.
  demo2d  the same on the phantom's 2D coronal projections (X-ray-like), 16^2 crops.
  test    seconds: tiny phantom, few steps.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    preset = arg or "paper"
    if preset not in ("paper", "demo", "demo2d", "test"):
        raise ValueError(f"unknown preset {preset!r}; use one of: paper, demo, demo2d, test")
    c = ml_collections.ConfigDict()
    c.method = "isimed"
    c.seed = 0
    c.distributed = False  # True: jax.distributed.initialize() for multi-host runs.

    c.data = ml_collections.ConfigDict()
    c.data.name = "chest_phantom"
    c.data.variant = "large3d"  # TFDS builder config; the phantom is synthetic.
    c.data.data_dir = "~/tensorflow_datasets"
    c.data.crop_size = (32, 32, 32)
    c.data.crops_per_image = 32
    c.data.images_per_batch = 32  # 32 images x 32 crops = 1024 crops per step.
    c.data.window = (-1000.0, 1000.0)  # CT HU window -> [-1, 1].
    c.data.min_foreground = 0.5  # Crops hold at least this share of voxels inside the body.
    c.data.foreground_threshold = -900.0  # HU; air outside the body is about -1000.
    # Two-view methods (SimCLR, VICReg, Barlow): the second crop is shifted by up to this share of
    # the crop size per axis.
    c.data.view_offset = 0.25
    c.data.num_threads = 8
    c.data.prefetch = 4
    c.data.num_workers = 4

    c.model = ml_collections.ConfigDict()
    c.model.name = "densenet121"
    c.model.embed_dim = 1024
    c.model.dtype = "bfloat16"

    c.loss = ml_collections.ConfigDict()
    c.loss.scale = 100.0  # mm; target distance = physical distance / scale.
    # "within" an image, or "all" (adds cross-image pairs): phantom subjects share one world frame
    # up to small pose changes, so cross-subject distances carry signal (as on atlas-registered data).
    c.loss.pairs = "all"
    c.loss.within_weight = 1.0
    c.loss.cross_weight = 1.0
    c.loss.learnable_scale = False

    c.optim = ml_collections.ConfigDict()
    c.optim.learning_rate = 1e-3
    c.optim.weight_decay = 1e-2
    c.optim.schedule = "cosine"  # or "exponential" (the reference: x decay_rate per decay_steps)
    c.optim.warmup_steps = 500
    c.optim.decay_rate = 0.9
    c.optim.decay_steps = 1000
    c.optim.grad_clip = 2.0

    c.total_steps = 20_000
    c.log_every = 50
    c.eval_every = 1000
    c.checkpoint_every = 1000
    c.keep_checkpoints = 3

    # Held-out evaluation: fixed crops of validation (during training) and test (at the end) subjects.
    c.eval = ml_collections.ConfigDict()
    c.eval.crops_per_image = 32
    c.eval.max_images = 32
    c.eval.probe_train_images = 64  # Train-split images for the ridge position probe.

    if preset in ("demo", "demo2d"):
        c.data.variant = "demo3d"
        c.data.crop_size = (16, 16, 16)
        c.data.crops_per_image = 16
        c.data.images_per_batch = 8
        c.data.num_threads = 2
        c.data.num_workers = 0
        c.model.name = "small_cnn"
        c.model.embed_dim = 128
        c.model.dtype = "float32"
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 50
        c.total_steps = 800
        c.log_every = 50
        c.eval_every = 200
        c.checkpoint_every = 200
        c.eval.max_images = 16
        c.eval.probe_train_images = 32
        if preset == "demo2d":
            c.data.variant = "demo2d"
            c.data.crop_size = (16, 16)
            c.total_steps = 400
    elif preset == "test":
        c.data.variant = "tiny3d"
        c.data.crop_size = (8, 8, 8)
        c.data.crops_per_image = 8
        c.data.images_per_batch = 4
        c.data.num_threads = 1
        c.data.num_workers = 0
        c.model.name = "small_cnn"
        c.model.embed_dim = 32
        c.model.dtype = "float32"
        c.optim.learning_rate = 3e-3
        c.optim.warmup_steps = 5
        c.total_steps = 150
        c.log_every = 10
        c.eval_every = 50
        c.checkpoint_every = 50
        c.eval.crops_per_image = 16
        c.eval.max_images = 4
        c.eval.probe_train_images = 8
    return c
