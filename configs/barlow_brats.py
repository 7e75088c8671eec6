"""Barlow Twins baseline on BraTS 2021 T1 MRI: the data, encoder, optimiser, crops per step, steps
and presets of `isimed_brats.py`, with the Barlow Twins loss, head and two augmented views
(`isimed/methods.py`). The workdir defaults to `workdirs/barlow_brats[_PRESET]`.

  isimed-barlow --config=configs/barlow_brats.py --config.data.dir=~/data/prepared/brats2021_t1
  python main.py --config=configs/barlow_brats.py --config.data.dir=~/data/prepared/brats2021_t1
"""

import ml_collections

from configs import isimed_brats


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_brats.get_config(arg, method="barlow")
