"""The part every real-data config shares: `isimed_chest.py`'s preset with the data read from a
folder written by `python -m isimed.data.prepare` (`--config.data.dir=...`)."""

import ml_collections

from configs import isimed_chest

PRESETS = ("paper", "demo", "test")


def get_base(arg: str | None) -> tuple[ml_collections.ConfigDict, str]:
    """(config, preset): everything but the data from `isimed_chest.py`'s preset of that name."""
    preset = arg or "paper"
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; use one of: {', '.join(PRESETS)}")
    c = isimed_chest.get_config(preset)
    c.data.name = "prepared"
    c.data.dir = ml_collections.config_dict.placeholder(str)  # Required: the prepare --out folder.
    c.data.variant = ""  # Unused by prepared data (as is data.data_dir).
    c.data.window = None  # Normalised when prepared (see each config for how).
    # Normalised units: -0.9 is -900 HU under the CT window [-1000, 1000]; crops must be at least
    # half inside the body. MRI and radiograph configs override these.
    c.data.foreground_threshold = -0.9
    c.data.min_foreground = 0.5
    # Subjects are not registered to one frame unless a config says so: within-image pairs only.
    c.loss.pairs = "within"
    return c, preset
