"""Pretraining on the synthetic chest phantom (ISImed unless the argument names another method).

Presets (`--config=configs/isimed_chest.py:PRESET[,method=M][,head=true]`, `configs/common.py`):
  (none)  paper scale: 3D DenseNet-121, 32^3 crops, 1024 crops per step, bf16 compute (accelerators).
  demo    a few minutes on 2 CPU cores: small 3D CNN, 16^3 crops.
  demo2d  the same on the phantom's 2D coronal projections (X-ray-like), 16^2 crops.
  test    seconds: tiny phantom, few steps.

Phantom subjects share one world frame up to small pose changes (`data.shared_frame`), so
cross-subject distances carry signal (as on atlas-registered data): ISImed uses all pairs.

  python main.py --config=configs/isimed_chest.py:demo,method=simclr
  python main.py --config=configs/isimed_chest.py:demo,method=isimed_vicreg --config.loss.vicreg_weight=0.3
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parsed = common.parse_arg(arg)
    return common.pretraining(parsed, common.phantom_data(parsed.preset))
