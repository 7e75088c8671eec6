import importlib
import os

import pytest

from configs import common
from isimed import methods

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "common.py")


@pytest.mark.parametrize("name", CONFIGS)
def test_every_config_builds_its_presets_and_refuses_unknown_ones(name):
    module = importlib.import_module(f"configs.{name}")
    built = 0
    for preset in (None, *common.PRESETS):
        try:
            config = module.get_config(preset)
        except ValueError as e:  # A preset this config does not offer (e.g. demo2d for 3D data).
            assert "unknown preset" in str(e) and preset == "demo2d", (preset, e)
            continue
        built += 1
        if "method" in config:  # Pretraining: the method's defaults, and nothing else, in loss.
            assert set(config.loss) == set(methods.get(config.method).defaults)
    assert built >= 4
    with pytest.raises(ValueError, match="unknown preset 'tset'"):
        module.get_config("tset")


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_two_view_methods_keep_the_crops_through_the_encoder(name):
    isimed = common.pretraining("demo", common.phantom_data("demo"))
    other = common.pretraining("demo", common.phantom_data("demo"), name)
    views = methods.get(name).views
    assert other.data.crops_per_image * views == isimed.data.crops_per_image
    assert ("augment" in other) == (views == 2)
    assert ("head_dims" in other.model) == (methods.get(name).head_dims is not None)
