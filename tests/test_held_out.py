"""The held-out summary follows the data's frame (`data.shared_frame`): cross-subject measures only
where subjects share one world frame."""

import numpy as np

from isimed import methods
from isimed import train
from isimed.evaluation import held_out


def _embed(crops: np.ndarray) -> np.ndarray:
    """Stand-in features: a few voxels of each crop (what is reported must not depend on them)."""
    return crops.reshape(len(crops), -1)[:, ::37].astype(np.float32)


def test_summary_without_a_shared_frame_has_no_cross_subject_measures(test_config):
    shared = held_out.held_out_summary(test_config, _embed, "test", with_probe=True)
    cross_subject = {"spearman_all", "position_probe", "position_probe_raw_intensity"}
    assert set(shared) == {"spearman_within", *cross_subject}
    assert "all pairs" in train.format_summary({"final": shared, "step": 1})

    test_config.data.shared_frame = False  # As for AutoPET, ChestMNIST or a folder of scans.
    assert methods.loss_config(test_config).pairs == "within"
    own = held_out.held_out_summary(test_config, _embed, "test", with_probe=True)
    assert set(own) == {
        "spearman_within",
        "position_probe_within_subject",
        "position_probe_within_subject_raw_intensity",
    }
    assert not cross_subject & set(own)
    assert own["spearman_within"] == shared["spearman_within"]  # The same crops.
    probe = own["position_probe_within_subject"]
    assert probe["subjects"] == test_config.eval.max_images and np.isfinite(probe["mae_mm"])
    text = train.format_summary({"final": own, "step": 1})
    assert "all pairs" not in text and "within each subject" in text
