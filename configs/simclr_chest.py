"""SimCLR (Chen et al., 2020): NT-Xent over the global batch, temperature 0.1, MLP projector to 128-d.

Same data, encoder, optimiser, crops per step and steps as `isimed_chest.py`, with the same presets:

  python main.py --config=configs/simclr_chest.py:demo --workdir=workdirs/simclr_chest_demo
"""

import ml_collections

from configs import isimed_chest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return isimed_chest.get_config(arg, method="simclr")
