"""ISImed pretraining on any folder prepared with `isimed.data.prepare` (NIfTI / NRRD / DICOM).

  python -m isimed.data.prepare --layout=glob --root=~/data/my_ct \
      --image_pattern='*/image.nii.gz' --mask_pattern='{parent}/mask.nii.gz' \
      --intensity=ct --window=-1000,1000 --spacing=1.5 --out=~/data/prepared/my_ct
  python main.py --config=configs/isimed_folder.py:demo \
      --config.data.dir=~/data/prepared/my_ct --workdir=workdirs/isimed_my_ct

3D crops by default; for 2D data set `--config.data.crop_size='(32, 32)'`. The foreground
threshold is in normalised units ([-1, 1]): -0.9 is -900 HU in a [-1000, 1000] HU window; MRI
background is -1. The subjects are taken to lie in their own frames (`data.shared_frame = False`:
within-image pairs, within-subject evaluation); for data registered to one frame set
`--config.data.shared_frame=true` (all pairs, cross-subject evaluation).

Presets: (none) paper scale, `demo`, `test` (see `isimed_chest.py`; only the data differ, and
the `demo` recipe below); `method=` as for every data set (`configs/common.py`), e.g.
`isimed-simclr --config=configs/isimed_folder.py:demo --config.data.dir=~/data/prepared/my_ct`.

The `demo` recipe for real scans (docs/results.md, "Position transfer on real MRI"): 24^3 crops (more
context than 16^3: where the crop sits in the body, left or right of the midline), 4 images x 16
crops per step (64 crops: 24^3 crops cost ~2-4x more each), a learning rate of 3e-2 (3e-3
underfits in a few minutes), 1,500 steps, and for ISImed intensity augmentation (scale/shift,
noise, blur; no flips, which would mirror left and right, and no dropout), so that the encoder is
not thrown off by another scan's shading and noise.
"""

import ml_collections

from configs import common
from isimed import augment


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # CT defaults: prepared with the HU window [-1000, 1000] -> [-1, 1].
    parsed = common.parse_arg(arg, ("paper", "demo", "test"))
    config = common.pretraining(parsed, common.prepared_data(parsed.preset))
    if parsed.preset == "demo":
        demo_recipe(config)
    return config


def demo_recipe(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """The folder `demo` preset's optimiser, length and (one-view methods) augmentation. Every
    method gets the same optimiser and steps; two-view methods keep their own augmentation."""
    config.data.crop_size = (24, 24, 24)
    config.data.images_per_batch = 4
    config.optim.learning_rate = 3e-2
    config.total_steps = 1500
    config.eval_every = config.checkpoint_every = 500
    if "augment" not in config:
        config.augment = augment.default_config()
        config.augment.flip_prob = 0.0  # A flipped crop looks like one from the mirrored side.
        config.augment.dropout_prob = 0.0
    return config
