"""VICReg baseline on ChestMNIST 2D radiographs: the data, encoder, optimiser, crops per step, steps
and presets of `isimed_chestmnist.py`, with the VICReg loss, head and two augmented views
(`isimed/methods.py`). The workdir defaults to `workdirs/vicreg_chestmnist[_PRESET]`.

  isimed-vicreg --config=configs/vicreg_chestmnist.py:demo --config.data.dir=~/data/prepared/chestmnist_64
  python main.py --config=configs/vicreg_chestmnist.py:demo --config.data.dir=~/data/prepared/chestmnist_64
"""

import ml_collections

from configs import isimed_chestmnist


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_chestmnist.get_config(arg, method="vicreg")
