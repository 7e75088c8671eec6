"""Barlow Twins (Zbontar et al., 2021; the ISImed authors' baseline): lambda 0.0051.

Same data, encoder, optimiser, crops per step and steps as `isimed_chest.py`, with the same presets:

  python main.py --config=configs/barlow_chest.py:demo --workdir=workdirs/barlow_chest_demo
"""

import ml_collections

from configs import isimed_chest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_chest.get_config(arg, method="barlow")
