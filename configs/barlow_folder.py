"""Barlow Twins baseline on a folder prepared with `isimed.data.prepare`: the data, encoder,
optimiser, crops per step, steps and presets of `isimed_folder.py`, with the Barlow Twins loss,
head and two augmented views (`isimed/methods.py`). The workdir defaults to
`workdirs/barlow_folder[_PRESET]`.

  isimed-barlow --config=configs/barlow_folder.py:demo --config.data.dir=~/data/prepared/my_ct
  python main.py --config=configs/barlow_folder.py:demo --config.data.dir=~/data/prepared/my_ct
"""

import ml_collections

from configs import isimed_folder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_folder.get_config(arg, method="barlow")
