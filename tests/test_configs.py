import importlib
import os

import pytest

from configs import common
from isimed import methods

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CONFIGS = sorted(f[:-3] for f in os.listdir(CONFIG_DIR) if f.endswith(".py") and f != "common.py")
# Pretraining on one data set each; they take the config argument of configs/common.py.
DATA_CONFIGS = [name for name in CONFIGS if name.startswith("isimed_")]


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


@pytest.mark.parametrize("name", DATA_CONFIGS)
@pytest.mark.parametrize("method", sorted(methods.METHODS))
def test_every_data_config_takes_every_method(name, method):
    module = importlib.import_module(f"configs.{name}")
    config = module.get_config(f"test,method={method}")
    assert config.method == method
    assert set(config.loss) == set(methods.get(method).defaults)
    # The same data and crops through the encoder per step, whatever the method.
    plain = module.get_config("test")
    assert config.data.to_dict() == plain.data.to_dict()


@pytest.mark.parametrize(
    "arg,expected",
    [
        (None, common.Arg("paper", "isimed", False)),
        ("demo", common.Arg("demo", "isimed", False)),
        ("demo,method=simclr", common.Arg("demo", "simclr", False)),
        ("method=vicreg", common.Arg("paper", "vicreg", False)),
        ("head=true,demo", common.Arg("demo", "isimed", True)),
        (" demo , method=barlow ", common.Arg("demo", "barlow", False)),
    ],
)
def test_config_argument_grammar(arg, expected):
    assert common.parse_arg(arg) == expected


@pytest.mark.parametrize(
    "arg,message",
    [
        ("demo,method=byol", "unknown method 'byol'"),
        ("demo,head=yes", "head must be true or false, got 'yes'"),
        ("demo,heads=true", "unknown key 'heads'"),
        ("demo,test", "preset given twice"),
        ("method=simclr,method=vicreg", "method given twice"),
        ("demo,method=simclr,head=true", "head=true is for method=isimed"),
        ("demo2d", "unknown preset 'demo2d'"),
    ],
)
def test_config_argument_errors_name_the_problem(arg, message):
    with pytest.raises(ValueError, match=message):
        common.parse_arg(arg, ("paper", "demo", "test"))


def test_linear_eval_configs_take_a_preset_only():
    module = importlib.import_module("configs.linear_eval_chest")
    with pytest.raises(ValueError, match="takes a preset only"):
        module.get_config("demo,method=simclr")


@pytest.mark.parametrize("name", sorted(methods.METHODS))
def test_every_method_sends_the_same_crops_through_the_encoder(name):
    isimed = common.pretraining(common.Arg("demo"), common.phantom_data("demo"))
    other = common.pretraining(common.Arg("demo", name), common.phantom_data("demo"))
    views = methods.get(name).views
    assert other.data.crops_per_image == isimed.data.crops_per_image
    assert ("augment" in other) == (views == 2)
    assert ("head_dims" in other.model) == (methods.get(name).head_dims is not None)


def test_head_and_hybrid_arguments_keep_what_their_configs_did():
    from configs import isimed_chest

    head = isimed_chest.get_config("demo,head=true")
    assert head.method == "isimed" and tuple(head.model.head_dims) == methods.ISIMED_HEAD["demo"]
    assert "head_dims" not in isimed_chest.get_config("demo,head=false").model
    hybrid = isimed_chest.get_config("demo,method=isimed_vicreg")
    assert hybrid.augment.flip_prob == 0.0  # Flips would teach the distance loss to forget laterality.
    assert isimed_chest.get_config("demo,method=vicreg").augment.flip_prob > 0


@pytest.mark.parametrize(
    "name,shared",
    [
        ("isimed_chest", True),
        ("isimed_brats", True),
        ("isimed_autopet", False),
        ("isimed_chestmnist", False),
        ("isimed_folder", False),
    ],
)
def test_loss_pairs_follow_the_shared_frame_unless_set(name, shared):
    config = importlib.import_module(f"configs.{name}").get_config("test")
    assert config.data.shared_frame is shared
    assert methods.loss_config(config).pairs == ("all" if shared else "within")
    config.data.shared_frame = not shared  # A folder of registered scans, say.
    assert methods.loss_config(config).pairs == ("within" if shared else "all")
    config.loss.pairs = "within"  # The user's choice wins.
    assert methods.loss_config(config).pairs == "within"
