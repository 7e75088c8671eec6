"""Barlow Twins baseline on AutoPET whole-body CT (CTres): the data, encoder, optimiser, crops per
step, steps and presets of `isimed_autopet.py`, with the Barlow Twins loss, head and two
augmented views (`isimed/methods.py`). The workdir defaults to
`workdirs/barlow_autopet[_PRESET]`.

  isimed-barlow --config=configs/barlow_autopet.py --config.data.dir=~/data/prepared/autopet_ctres
  python main.py --config=configs/barlow_autopet.py --config.data.dir=~/data/prepared/autopet_ctres
"""

import ml_collections

from configs import isimed_autopet


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_autopet.get_config(arg, method="barlow")
