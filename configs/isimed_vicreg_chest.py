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
    config = isimed_chest.get_config(arg, method="isimed_vicreg")
    # No flips: the distance loss sees the augmented first view, and a flipped crop of one side of
    # the body looks like an unflipped crop of the other, so flips teach the encoder to forget
    # laterality (with flips, demo runs stayed at ~30 mm position error at every VICReg weight).
    config.augment.flip_prob = 0.0
    return config
