"""VICReg baseline on AutoPET whole-body CT (CTres): the data, encoder, optimiser, crops per step,
steps and presets of `isimed_autopet.py`, with the VICReg loss, head and two augmented views
(`isimed/methods.py`). The workdir defaults to `workdirs/vicreg_autopet[_PRESET]`.

  isimed-vicreg --config=configs/vicreg_autopet.py --config.data.dir=~/data/prepared/autopet_ctres
  python main.py --config=configs/vicreg_autopet.py --config.data.dir=~/data/prepared/autopet_ctres
"""

import ml_collections

from configs import isimed_autopet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_autopet.get_config(arg, method="vicreg")
