"""ISImed pretraining on any folder prepared with `isimed.data.prepare` (NIfTI / NRRD / DICOM).

  python -m isimed.data.prepare --layout=glob --root=~/data/my_ct \
      --image_pattern='*/image.nii.gz' --mask_pattern='{parent}/mask.nii.gz' \
      --intensity=ct --window=-1000,1000 --spacing=1.5 --out=~/data/prepared/my_ct
  python main.py --config=configs/isimed_folder.py:demo \
      --config.data.dir=~/data/prepared/my_ct --workdir=workdirs/isimed_my_ct

3D crops by default; for 2D data set `--config.data.crop_size='(32, 32)'`. The foreground
threshold is in normalised units ([-1, 1]): -0.9 is -900 HU in a [-1000, 1000] HU window; MRI
background is -1. Pairs are "within" images unless the subjects are registered to one frame
(then `--config.loss.pairs=all`).

Presets: (none) paper scale, `demo`, `test` (see `isimed_chest.py`; only the data differ).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None, method: str = "isimed") -> ml_collections.ConfigDict:
    # CT defaults: prepared with the HU window [-1000, 1000] -> [-1, 1].
    preset = common.preset(arg, ("paper", "demo", "test"))
    return common.within_image_pairs(common.pretraining(preset, common.prepared_data(preset), method))
