"""Every registered method trains through the one loop; two-view sampling; baseline configs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import isimed_chest
from isimed import losses
from isimed import methods
from isimed import runtime
from isimed import train_state
from isimed.data import pipeline

# Config arguments of configs/isimed_chest.py besides the preset.
BASELINE_CONFIGS = ["method=simclr", "method=vicreg", "method=barlow", "method=isimed_vicreg"]
ISIMED_CONFIGS = ["method=isimed", "head=true"]


def _config(arg="", preset="test"):
    return isimed_chest.get_config(",".join(t for t in (preset, arg) if t))


def _random_batch(config, rng, b=4):
    # Positions per image: the crops through the encoder, divided among the views.
    k = config.data.crops_per_image // methods.get(config.method).views
    c = tuple(config.data.crop_size)
    batch = {
        "crops": rng.uniform(-1, 1, size=(b, k, *c, 1)).astype(np.float32),
        "centres": rng.uniform(-150, 150, size=(b, k, len(c))).astype(np.float32),
    }
    if methods.get(config.method).views == 2:
        # A second view near the first, as the pipeline samples it.
        batch["views"] = np.clip(batch["crops"] + rng.normal(0, 0.1, batch["crops"].shape), -1, 1).astype(
            np.float32
        )
    return batch


@pytest.mark.parametrize("name", [*ISIMED_CONFIGS, *BASELINE_CONFIGS])
def test_each_method_lowers_its_loss_and_logs_its_terms(name):
    config = _config(name)
    method = methods.get(config.method)
    if method.views == 2:  # Fixed views: the loss on a fixed batch must then go down.
        for key in config.augment:
            if key.endswith("_prob"):
                config.augment[key] = 0.0
    setup = train_state.create_train_step(config, runtime.make_mesh())
    assert (setup.networks.head_params is not None) == ("head_dims" in config.model)
    state, step = setup.state, setup.step
    initial = jax.tree.map(np.asarray, state["params"])
    batch = _random_batch(config, np.random.default_rng(0))
    losses_seen = []
    for _ in range(15):
        state, metrics = step(state, batch)
        scalars = metrics.compute()
        losses_seen.append(float(scalars["loss"]))
    assert set(method.terms) <= set(scalars)
    assert np.all(np.isfinite(losses_seen))
    assert np.mean(losses_seen[-3:]) < losses_seen[0], losses_seen
    for part in state["params"]:  # Encoder and head (if any) are both trained.
        changed = jax.tree.map(
            lambda a, b: not np.allclose(a, b), initial[part], jax.tree.map(np.asarray, state["params"][part])
        )
        assert any(jax.tree.leaves(changed)), part


def test_collapse_monitors_see_collapse():
    """The logging-step monitors: identical crops give identical embeddings (RankMe at most 1:
    0 for all-zero embeddings, std 0); random crops give many effective dimensions."""
    config = _config()
    setup = train_state.create_train_step(config, runtime.make_mesh())
    batch = _random_batch(config, np.random.default_rng(0))
    spread = jax.device_get(setup.monitors(setup.state, batch))
    batch["crops"] = np.broadcast_to(batch["crops"][:1, :1], batch["crops"].shape).copy()
    collapsed = jax.device_get(setup.monitors(setup.state, batch))
    assert collapsed["rankme"] <= 1.0 + 1e-3
    assert collapsed["embedding_std"] == pytest.approx(0.0, abs=1e-4)
    assert spread["rankme"] > 5 and spread["embedding_std"] > 0.01, spread


def _hybrid_inputs(config):
    rng = np.random.default_rng(1)
    outputs = {
        "z": rng.normal(size=(3, 5, 8)).astype(np.float32),
        "p1": rng.normal(size=(15, 6)).astype(np.float32),
        "p2": rng.normal(size=(15, 6)).astype(np.float32),
    }
    batch = {"centres": rng.uniform(-100, 100, size=(3, 5, 3)).astype(np.float32)}
    distance, _ = losses.isimed_loss(
        outputs["z"], batch["centres"], scale=50.0, pairs=methods.loss_config(config).pairs
    )
    vicreg, _ = losses.vicreg_loss(outputs["p1"], outputs["p2"])
    return outputs, batch, float(distance), float(vicreg)


def test_hybrid_loss_is_the_weighted_sum_of_its_parts():
    config = _config("method=isimed_vicreg")
    config.loss.isimed_weight, config.loss.vicreg_weight = 0.7, 0.2
    config.loss.scale = 50.0
    config.loss.normalise = False
    outputs, batch, distance, vicreg = _hybrid_inputs(config)
    loss, aux = methods.get("isimed_vicreg").loss(outputs, batch, methods.loss_config(config))
    np.testing.assert_allclose(loss, 0.7 * distance + 0.2 * vicreg, rtol=1e-5)
    np.testing.assert_allclose(aux["isimed"], distance, rtol=1e-6)
    assert "loss_ref" not in aux


def test_normalised_hybrid_divides_each_term_by_its_first_value():
    config = _config("method=isimed_vicreg")
    assert config.loss.normalise  # The default.
    config.loss.isimed_weight, config.loss.vicreg_weight = 0.7, 0.2
    config.loss.scale = 50.0
    method = methods.get("isimed_vicreg")
    outputs, batch, distance, vicreg = _hybrid_inputs(config)
    # First step (references 0: not measured): both terms are 1, the references their raw values.
    outputs["loss_ref"] = method.init_loss_ref(config.loss)
    loss, aux = method.loss(outputs, batch, methods.loss_config(config))
    np.testing.assert_allclose(loss, 0.7 + 0.2, rtol=1e-6)
    np.testing.assert_allclose(
        [aux["loss_ref"]["isimed"], aux["loss_ref"]["vicreg"]], [distance, vicreg], rtol=1e-6
    )
    np.testing.assert_allclose([aux["isimed"], aux["vicreg"]], [distance, vicreg], rtol=1e-6)  # Logged raw.
    # Later steps divide by the stored running means and move them towards the current terms.
    outputs["loss_ref"] = {"isimed": np.float32(2.0), "vicreg": np.float32(8.0)}
    loss, aux = method.loss(outputs, batch, methods.loss_config(config))
    np.testing.assert_allclose(loss, 0.7 * distance / 2.0 + 0.2 * vicreg / 8.0, rtol=1e-5)
    d = config.loss.normalise_decay
    np.testing.assert_allclose(aux["loss_ref"]["isimed"], d * 2.0 + (1 - d) * distance, rtol=1e-6)
    np.testing.assert_allclose(aux["loss_ref"]["vicreg"], d * 8.0 + (1 - d) * vicreg, rtol=1e-6)


def test_hybrid_references_start_at_the_first_steps_terms_and_live_in_the_state():
    """The running means start at step 0's terms and are carried in the (checkpointed) state."""
    config = _config("method=isimed_vicreg")
    for key in config.augment:
        if key.endswith("_prob"):
            config.augment[key] = 0.0
    setup = train_state.create_train_step(config, runtime.make_mesh())
    assert set(setup.state["loss_ref"]) == {"isimed", "vicreg"}
    assert (
        "loss_ref" not in train_state.create_train_step(_config("method=vicreg"), runtime.make_mesh()).state
    )
    batch = _random_batch(config, np.random.default_rng(0))
    state, metrics = setup.step(setup.state, batch)
    first = metrics.compute()
    ref = jax.device_get(state["loss_ref"])
    np.testing.assert_allclose([ref["isimed"], ref["vicreg"]], [first["isimed"], first["vicreg"]], rtol=1e-6)
    np.testing.assert_allclose(
        first["loss"], config.loss.isimed_weight + config.loss.vicreg_weight, rtol=1e-5
    )
    state, metrics = setup.step(state, batch)
    second, d = metrics.compute(), config.loss.normalise_decay
    new = jax.device_get(state["loss_ref"])
    for name in ("isimed", "vicreg"):
        np.testing.assert_allclose(new[name], d * ref[name] + (1 - d) * second[name], rtol=1e-5)
    expected = sum(config.loss[f"{n}_weight"] * second[n] / ref[n] for n in ("isimed", "vicreg"))
    np.testing.assert_allclose(second["loss"], expected, rtol=1e-5)


def test_isimed_head_carries_the_distance_loss():
    """With a head, ISImed's distance loss is on the head's output, not on the encoder embeddings."""
    config = _config("head=true")
    assert tuple(config.model.head_dims) == methods.ISIMED_HEAD["test"]
    assert "head_dims" not in _config().model  # Off in the plain config.
    outputs, batch, _, _ = _hybrid_inputs(_config("method=isimed_vicreg"))
    outputs = {"z": outputs["z"], "p1": outputs["p1"]}
    loss, _ = methods.get("isimed").loss(outputs, batch, methods.loss_config(config))
    on_head, _ = losses.isimed_loss(
        outputs["p1"].reshape(3, 5, 6), batch["centres"], scale=config.loss.scale, pairs="all"
    )
    np.testing.assert_allclose(loss, on_head, rtol=1e-6)


def test_augmentation_is_a_function_of_seed_and_step():
    """Resuming replays the same augmented views: the step's key depends only on (seed, step)."""
    config = _config("method=simclr")
    mesh = runtime.make_mesh()
    setup = train_state.create_train_step(config, mesh)
    batch = _random_batch(config, np.random.default_rng(2))
    fresh = lambda: jax.tree.map(jnp.copy, setup.state)  # The step donates its state.
    runs = [setup.step(fresh(), batch)[1].compute()["loss"] for _ in range(2)]
    assert float(runs[0]) == float(runs[1])
    config.seed = 1  # Same initial state, another seed for the augmentation key only.
    other = train_state.create_train_step(config, mesh)
    assert float(other.step(fresh(), batch)[1].compute()["loss"]) != float(runs[0])


@pytest.mark.parametrize("name", BASELINE_CONFIGS)
@pytest.mark.parametrize("preset", [None, "demo", "demo2d", "test"])
def test_baselines_match_isimed_budget(name, preset):
    isimed, baseline = _config("", preset), _config(name, preset)
    assert methods.get(baseline.method).views == 2
    # The same encoder, optimiser and steps, and the same crops through the encoder per step.
    assert baseline.model.name == isimed.model.name and baseline.total_steps == isimed.total_steps
    assert baseline.optim.to_dict() == isimed.optim.to_dict()
    assert baseline.data.crops_per_image == isimed.data.crops_per_image
    assert baseline.data.images_per_batch == isimed.data.images_per_batch


def test_second_view_is_a_shifted_crop_inside_the_image():
    image = np.arange(20 * 24 * 28, dtype=np.float32).reshape(20, 24, 28)
    record = {"id": 3, "image": image, "affine": np.eye(4)}
    crop = (8, 8, 8)
    offset = 0.25
    sampler = pipeline.SampleCrops(crop, 64, window=None, views=2, view_offset=offset)
    out = sampler.random_map(record, np.random.default_rng(0))
    assert out["views"].shape == out["crops"].shape == (64, *crop, 1)
    # Voxel values encode their index, so each crop's first voxel gives its start.
    start = lambda v: np.stack(np.unravel_index(v[:, 0, 0, 0, 0].astype(int), image.shape), axis=1)
    shift = start(out["views"]) - start(out["crops"])
    assert np.all(np.abs(shift) <= np.floor(offset * np.array(crop)))
    assert np.any(shift != 0)
    same = pipeline.SampleCrops(crop, 8, window=None, views=2, view_offset=0.0)
    out = same.random_map(record, np.random.default_rng(0))
    np.testing.assert_array_equal(out["views"], out["crops"])
