import pytest

from configs import isimed_chest
from configs import linear_eval_chest


@pytest.mark.parametrize("module", [isimed_chest, linear_eval_chest])
def test_presets_build_and_unknown_preset_fails(module):
    for preset in (None, "demo", "test"):
        module.get_config(preset)
    if module is isimed_chest:
        assert len(module.get_config("demo2d").data.crop_size) == 2
    with pytest.raises(ValueError, match="unknown preset"):
        module.get_config("tset")


def test_paper_preset_matches_the_reference_setup():
    c = isimed_chest.get_config()
    assert c.model.name == "densenet121" and c.model.embed_dim == 1024
    assert tuple(c.data.crop_size) == (32, 32, 32)
    assert c.data.images_per_batch * c.data.crops_per_image == 1024
    assert (c.optim.learning_rate, c.optim.weight_decay, c.optim.grad_clip) == (1e-3, 1e-2, 2.0)
    assert c.model.dtype == "bfloat16"


def test_locked_config_rejects_unknown_fields():
    c = isimed_chest.get_config("test")
    c.lock()
    with pytest.raises(AttributeError):
        c.data.crop_sise = (4, 4, 4)
