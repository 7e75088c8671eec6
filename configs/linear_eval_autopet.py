"""Linear evaluation on AutoPET CTres: crop-level "contains FDG-avid lesion" (the paper's protocol).

  python linear_eval.py --config=configs/linear_eval_autopet.py \
      --config.pretrain_workdir=workdirs/isimed_autopet --workdir=workdirs/isimed_autopet/eval

About half of AutoPET's studies are negative controls without lesions; they contribute negative
crops only. Presets: (none), demo, test.
"""

import ml_collections

from configs import linear_eval_chest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return linear_eval_chest.get_config(arg)  # The chest protocol is the paper's protocol.
