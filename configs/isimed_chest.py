"""ISImed pretraining on the synthetic chest phantom.

Presets (`--config=configs/isimed_chest.py:PRESET`):
  (none)  paper scale: 3D DenseNet-121, 32^3 crops, 1024 crops per step, bf16 compute (accelerators).
  demo    a few minutes on 2 CPU cores: small 3D CNN, 16^3 crops.
  demo2d  the same on the phantom's 2D coronal projections (X-ray-like), 16^2 crops.
  test    seconds: tiny phantom, few steps.

Phantom subjects share one world frame up to small pose changes, so cross-subject distances carry
signal (as on atlas-registered data): ISImed uses all pairs.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None, method: str = "isimed") -> ml_collections.ConfigDict:
    preset = common.preset(arg)
    return common.pretraining(preset, common.phantom_data(preset), method)
