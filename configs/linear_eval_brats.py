"""Linear evaluation on BraTS 2021 T1 (the paper's protocol): crop-level "contains tumour".

  python linear_eval.py --config=configs/linear_eval_brats.py \
      --config.pretrain_workdir=workdirs/isimed_brats --workdir=workdirs/isimed_brats/eval

The prepared data folder, crop size and encoder come from the pretraining checkpoint's config;
`--config.data_dir=DIR` points at a moved prepared folder. 64 crops per test subject, 39% of
them centred on tumour voxels, 5 subject-grouped folds. Presets: (none), demo, test.
"""

import ml_collections

from configs import linear_eval_chest


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    return linear_eval_chest.get_config(arg)  # The chest protocol is the paper's protocol.
