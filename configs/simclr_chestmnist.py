"""SimCLR baseline on ChestMNIST 2D radiographs: the data, encoder, optimiser, crops per step, steps
and presets of `isimed_chestmnist.py`, with the SimCLR loss, head and two augmented views
(`isimed/methods.py`). The workdir defaults to `workdirs/simclr_chestmnist[_PRESET]`.

  isimed-simclr --config=configs/simclr_chestmnist.py:demo --config.data.dir=~/data/prepared/chestmnist_64
  python main.py --config=configs/simclr_chestmnist.py:demo --config.data.dir=~/data/prepared/chestmnist_64
"""

import ml_collections

from configs import isimed_chestmnist


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_chestmnist.get_config(arg, method="simclr")
