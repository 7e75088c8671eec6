"""VICReg (Bardes et al., 2022): expander MLP, invariance / variance / covariance weights 25 / 25 / 1.

Same data, encoder, optimiser, crops per step and steps as `isimed_chest.py`, with the same presets:

  python main.py --config=configs/vicreg_chest.py:demo --workdir=workdirs/vicreg_chest_demo
"""

import ml_collections

from configs import isimed_chest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_chest.get_config(arg, method="vicreg")
