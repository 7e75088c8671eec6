"""The held-out summary pretraining logs: distance Spearman and the ridge position probe.

What it reports follows the data (`data.shared_frame`, `isimed.methods.shared_frame`):
- subjects in one world frame (the phantom, atlas-registered BraTS): Spearman over pairs within an
  image and over all pairs, and a position probe fitted on training-split subjects and tested on
  held-out ones (`position_probe`, `position_probe_raw_intensity`);
- subjects in their own frames (AutoPET, ChestMNIST, a folder by default): within-image Spearman
  only, and a position probe fitted and tested within each held-out subject
  (`position_probe_within_subject[_raw_intensity]`, `probes.within_subject_position_probe`), as
  distances and positions across unrelated frames mean nothing.
"""

from __future__ import annotations

from typing import Any

import ml_collections

from isimed import methods
from isimed.evaluation import features as features_lib
from isimed.evaluation import metrics as metrics_lib
from isimed.evaluation import probes


def held_out_summary(
    config: ml_collections.ConfigDict, embed, split: str, *, with_probe: bool, held=None
) -> dict[str, Any]:
    """Spearman(latent, physical) on fixed crops of held-out subjects, and the ridge position probe.

    With a shared frame the probe is trained on crops of training-split images and tested on
    `split`, without one fitted and tested within each `split` subject (module docstring); the same
    probe on raw crop intensities is the reference row. `held`: those crops, already collected
    (with crops).
    """
    if held is None:
        held = features_lib.collect(
            config, split, {"model": embed}, max_images=config.eval.max_images, with_crops=with_probe
        )
    z = held["embeddings"]["model"]
    shared = methods.shared_frame(config)
    out: dict[str, Any] = {
        f"spearman_{pairs}": metrics_lib.distance_spearman(z, held["centres"], pairs)
        for pairs in (("within", "all") if shared else ("within",))
    }
    if with_probe and not shared:
        n, k = held["centres"].shape[:2]
        within = probes.within_subject_position_probe
        out["position_probe_within_subject"] = within(z, held["centres"])
        out["position_probe_within_subject_raw_intensity"] = within(
            held["crops"].reshape(n, k, -1), held["centres"]
        )
    elif with_probe:
        train = features_lib.collect(
            config,
            "train",
            {"model": embed},
            max_images=config.eval.probe_train_images,
            with_crops=True,
        )
        flat = features_lib.flatten
        out["position_probe"] = probes.position_probe(
            flat(train["embeddings"]["model"]),
            flat(train["centres"]),
            flat(z),
            flat(held["centres"]),
        )
        n_train, n_held = len(flat(train["centres"])), len(flat(held["centres"]))
        out["position_probe_raw_intensity"] = probes.position_probe(
            flat(train["crops"]).reshape(n_train, -1),
            flat(train["centres"]),
            flat(held["crops"]).reshape(n_held, -1),
            flat(held["centres"]),
        )
    return out
