"""ISImed pretraining on BraTS 2021 T1 MRI (real data; download it yourself), as in the paper.

Prepare once (MRI foreground percentiles 5..95 -> [-1, 1], the authors' split lists), then train:

  python -m isimed.data.prepare --layout=brats --modality=t1 --splits=brats2021_t1 \
      --root=~/data/BraTS2021_Training_Data --out=~/data/prepared/brats2021_t1 --crop_foreground
  python main.py --config=configs/isimed_brats.py \
      --config.data.dir=~/data/prepared/brats2021_t1 --workdir=workdirs/isimed_brats

Presets (`configs/isimed_brats.py:PRESET[,method=M]`, `configs/common.py`): (none) paper scale,
3D DenseNet-121 on 32^3 crops, 1024 crops per step; `demo` small CNN on 16^3 crops (CPU minutes;
preparing with --spacing=2 makes a 16^3 crop cover 32 mm); `test` tiny, for the test suite.
Everything but the data comes from `isimed_chest.py`'s preset of the same name.
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parsed = common.parse_arg(arg, ("paper", "demo", "test"))
    data = common.prepared_data(parsed.preset)
    # Normalised when prepared: MRI foreground percentiles 5..95 -> [-1, 1].
    # Normalised units: the skull-stripped background (0) and the darkest 5% of the brain are -1.
    data.foreground_threshold = -0.99
    # BraTS volumes are co-registered to one atlas (SRI24, 1 mm), so distances between crops of
    # different subjects are meaningful too: ISImed uses all pairs.
    data.shared_frame = True
    return common.pretraining(parsed, data)
