"""Barlow Twins baseline on ChestMNIST 2D radiographs: the data, encoder, optimiser, crops per step,
steps and presets of `isimed_chestmnist.py`, with the Barlow Twins loss, head and two augmented
views (`isimed/methods.py`). The workdir defaults to `workdirs/barlow_chestmnist[_PRESET]`.

  isimed-barlow --config=configs/barlow_chestmnist.py:demo --config.data.dir=~/data/prepared/chestmnist_64
  python main.py --config=configs/barlow_chestmnist.py:demo --config.data.dir=~/data/prepared/chestmnist_64
"""

import ml_collections

from configs import isimed_chestmnist


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_chestmnist.get_config(arg, method="barlow")
