"""ISImed pretraining on AutoPET whole-body CT (`CTres`; real data, download it yourself).

CTres is the CT resampled onto the PET grid (so it shares the grid of SUV and SEG and the lesion
masks apply as they are). Spacing stays anisotropic unless --spacing is given: crop centres are in
world mm either way. The subjects are NOT registered to one frame (each scan has its own field of
view and scanner origin: `data.shared_frame = False`), so only pairs of crops within one image
carry a true distance: the loss uses within-image pairs and the evaluation within-subject measures.

  python -m isimed.data.prepare --layout=autopet --image=CTres --splits=autopet_ctres \
      --intensity=ct --window=-1000,1000 --root=~/data/autoPET --out=~/data/prepared/autopet_ctres
  python main.py --config=configs/isimed_autopet.py \
      --config.data.dir=~/data/prepared/autopet_ctres --workdir=workdirs/isimed_autopet

Presets: (none) paper scale, `demo`, `test` (see `isimed_chest.py`; only the data differ), and
`method=`, as for every data set (`configs/common.py`).
"""

import ml_collections

from configs import common


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
    # CT defaults: prepared with the HU window [-1000, 1000] -> [-1, 1]; data.shared_frame False.
    parsed = common.parse_arg(arg, ("paper", "demo", "test"))
    return common.pretraining(parsed, common.prepared_data(parsed.preset))
