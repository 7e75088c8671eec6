"""Shared settings of the two-view baselines (SimCLR, VICReg, Barlow Twins, ISImed + VICReg).

`two_view(config, method)` turns an `isimed_chest.py`-style config into the baseline's config with
the same data, encoder, optimiser, steps and evaluation. The encoder sees the same number of crops
per step as ISImed: K/2 positions per image, each as two views (the second shifted by up to
`data.view_offset` of the crop size), both augmented on device.
"""

import ml_collections

from isimed import augment

# Paper-scale head sizes; the CPU presets shrink them (see `two_view`).
SIMCLR_HIDDEN, SIMCLR_OUT = 2048, 128  # SimCLR projector: embed -> 2048 -> 128.
EXPANDER = (2048, 2048, 2048)  # VICReg / Barlow Twins expander for small encoders.


def two_view(c: ml_collections.ConfigDict, method: str, preset: str) -> ml_collections.ConfigDict:
    c.method = method
    if c.data.crops_per_image % 2:
        raise ValueError(f"two-view methods need an even data.crops_per_image, got {c.data.crops_per_image}")
    c.data.crops_per_image //= 2
    c.augment = augment.default_config()

    isimed_loss = c.loss
    c.loss = ml_collections.ConfigDict()
    expander = EXPANDER
    simclr_hidden = SIMCLR_HIDDEN
    if preset in ("demo", "demo2d"):
        expander, simclr_hidden = (1024, 1024, 1024), 512
    elif preset == "test":
        expander, simclr_hidden = (64, 64, 64), 64
    if method == "simclr":
        c.model.head_dims = (simclr_hidden, SIMCLR_OUT)
        c.loss.temperature = 0.1
    elif method in ("vicreg", "isimed_vicreg"):
        c.model.head_dims = expander
        c.loss.invariance_weight = 25.0
        c.loss.variance_weight = 25.0
        c.loss.covariance_weight = 1.0
        if method == "isimed_vicreg":
            c.loss.update(isimed_loss)
            c.loss.isimed_weight = 1.0
            c.loss.vicreg_weight = 0.04  # Brings VICReg's ~25-scale terms near the distance loss.
    elif method == "barlow":
        c.model.head_dims = expander
        c.loss.lambda_offdiag = 0.0051
    else:
        raise ValueError(f"not a two-view method: {method!r}")
    return c
