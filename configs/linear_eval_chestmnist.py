"""Linear evaluation on ChestMNIST: image-level multi-label classification of 14 findings.

  python linear_eval.py --config=configs/linear_eval_chestmnist.py:demo \
      --config.pretrain_workdir=workdirs/isimed_chestmnist_demo \
      --workdir=workdirs/isimed_chestmnist_demo/eval

There are no masks, so the lesion tasks are n/a: an image's feature is the mean of its crops'
features and a linear probe predicts the 14 labels (mean AUC over labels, subject-grouped folds).
Presets: (none), demo, test.
"""

import ml_collections

from configs import common
from configs import linear_eval_chest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    c = linear_eval_chest.get_config(arg)
    test = common.preset(arg, ("paper", "demo", "test")) == "test"
    c.lesion_share = 0.0  # No masks.
    c.crops_per_image = 8 if test else 16
    c.max_images = 32 if test else 2000
    return c
