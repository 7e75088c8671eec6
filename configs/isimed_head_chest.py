"""ISImed with a projection head: the distance loss on the output of an MLP head on the encoder
(SimCLR's projector sizes, `isimed.methods.ISIMED_HEAD`), as SimCLR and VICReg put their losses on
their heads' outputs; the head is dropped after pretraining. Presets as `isimed_chest.py`:

  python main.py --config=configs/isimed_head_chest.py:demo --workdir=workdirs/isimed_head_demo
"""

import ml_collections

from configs import common
from configs import isimed_chest
from isimed import methods


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    config = isimed_chest.get_config(arg)
    config.model.head_dims = methods.ISIMED_HEAD[common.preset(arg)]
    return config
