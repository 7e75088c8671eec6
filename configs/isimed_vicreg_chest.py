"""Hybrid ISImed + VICReg: `isimed_weight * distance loss + vicreg_weight * VICReg`, each term
divided by its value at the first step (`loss.normalise`), so the weights are the terms' shares at
initialisation (the ISImed authors also tried distance + Barlow Twins hybrids). Presets as
`isimed_chest.py`:

  python main.py --config=configs/isimed_vicreg_chest.py:demo --workdir=workdirs/isimed_vicreg_demo
  python main.py --config=configs/isimed_vicreg_chest.py:demo --config.loss.vicreg_weight=0.3 ...
"""

import ml_collections

from configs import isimed_chest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_chest.get_config(arg, method="isimed_vicreg")
