"""SimCLR baseline on a folder prepared with `isimed.data.prepare`: the data, encoder, optimiser,
crops per step, steps and presets of `isimed_folder.py`, with the SimCLR loss, head and two
augmented views (`isimed/methods.py`). The workdir defaults to `workdirs/simclr_folder[_PRESET]`.

  isimed-simclr --config=configs/simclr_folder.py:demo --config.data.dir=~/data/prepared/my_ct
  python main.py --config=configs/simclr_folder.py:demo --config.data.dir=~/data/prepared/my_ct
"""

import ml_collections

from configs import isimed_folder


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_folder.get_config(arg, method="simclr")
