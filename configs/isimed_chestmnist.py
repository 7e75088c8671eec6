"""ISImed pretraining on ChestMNIST (2D chest radiographs from NIH ChestX-ray14, via MedMNIST).

MedMNIST stores no pixel size; prepare with a nominal one (a radiograph spans roughly 420 mm, so
about 420/S mm for size S: 6.5 mm at 64, 1.9 mm at 224). Images are not registered to each
other, so only within-image pairs count.

  python -m isimed.data.prepare --layout=medmnist --root=~/data/chestmnist_64.npz \
      --spacing=6.5 --out=~/data/prepared/chestmnist_64
  python main.py --config=configs/isimed_chestmnist.py:demo \
      --config.data.dir=~/data/prepared/chestmnist_64 --workdir=workdirs/isimed_chestmnist_demo

Presets: (none) paper scale (2D DenseNet-121, 32^2 crops, for chestmnist_224), `demo` (small CNN,
16^2 crops, chestmnist_64), `test` (8^2 crops); `method=` as for every data set (`configs/common.py`).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    parsed = common.parse_arg(arg, ("paper", "demo", "test"))
    data = common.prepared_data(parsed.preset)  # data.shared_frame False: images are not registered.
    # Normalised when prepared: uint8 [0, 255] -> [-1, 1].
    data.crop_size = data.crop_size[:2]
    # Radiographs have no empty background to avoid: every crop is acceptable.
    data.min_foreground = 0.0
    data.foreground_threshold = -1.0
    return common.pretraining(parsed, data)
