"""Registry of pretraining methods. A method is one `Method` entry: what the pipeline samples, the
head it trains, its loss and its default hyperparameters per preset. The one training loop
(`isimed.train`) serves them all; adding a method is adding an entry here.

The loop calls `method.loss(outputs, batch, loss_config) -> (loss, aux)` with
- `outputs["z"]`: encoder embeddings `(B, K, D)` of the first view;
- `outputs["p1"]`, `outputs["p2"]`: the head's projections `(B*K, P)` of both views (augmented on
  device), for configs with a head (`config.model.head_dims`); one-view methods get `p1` only;
- the method's own trainable parameters (`Method.init_params`), e.g. ISImed's `log_scale`;
- `outputs["loss_ref"]`: the method's loss references kept in the train state
  (`Method.init_loss_ref`), e.g. the hybrid's terms at step 0.
`aux` holds the unweighted loss terms to log (`terms` averaged over steps, `last_terms` as their
latest value) and, for methods with loss references, their new value as `aux["loss_ref"]`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from isimed import augment
from isimed import losses

LossFn = Callable[[dict, dict, ml_collections.ConfigDict], tuple[jnp.ndarray, dict]]

# Head sizes per preset: paper scale, and smaller for the CPU presets.
_EXPANDER = {"paper": (2048,) * 3, "demo": (1024,) * 3, "demo2d": (1024,) * 3, "test": (64,) * 3}
_SIMCLR_PROJECTOR = {"paper": (2048, 128), "demo": (512, 128), "demo2d": (512, 128), "test": (64, 128)}
# ISImed's optional projection head (`--config=FILE:head=true`): SimCLR's projector sizes, so the
# distance loss constrains a 128-d output as NT-Xent does.
ISIMED_HEAD = _SIMCLR_PROJECTOR


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: LossFn
    terms: tuple[str, ...]
    defaults: dict[str, Any]  # The loss config (`config.loss`).
    views: int = 1  # 2: the pipeline samples a shifted second crop; both views are augmented.
    # Per preset; None: no head by default (a one-view method may still get one: a config that
    # sets `model.head_dims`, e.g. `configure(..., head=True)`).
    head_dims: dict[str, tuple[int, ...]] | None = None
    last_terms: tuple[str, ...] = ()
    init_params: Callable[[ml_collections.ConfigDict], dict] = lambda loss_config: {}
    # Non-trainable values the loss keeps in the train state (`state["loss_ref"]`, checkpointed
    # with it); {}: none.
    init_loss_ref: Callable[[ml_collections.ConfigDict], dict] = lambda loss_config: {}

    @property
    def has_distance_target(self) -> bool:
        """Whether the loss fits latent distances to physical ones (a `scale` in mm)."""
        return "scale" in self.defaults

    def target_scale_mm(self, params: dict, loss_config: ml_collections.ConfigDict) -> float | None:
        """The physical distance (mm) one unit of latent distance stands for: the learned scale
        where the params hold one, else `loss_config.scale`; None for methods without a distance
        target."""
        if not self.has_distance_target:
            return None
        if "log_scale" in params:
            return float(jnp.exp(params["log_scale"]))
        return float(loss_config.scale)


def _isimed_params(loss_config: ml_collections.ConfigDict) -> dict:
    if not loss_config.learnable_scale:
        return {}
    return {"log_scale": jnp.log(jnp.float32(loss_config.scale))}


def _distance(embeddings, outputs, batch, loss_config):
    scale = jnp.exp(outputs["log_scale"]) if "log_scale" in outputs else loss_config.scale
    loss, aux = losses.isimed_loss(
        embeddings,
        batch["centres"],
        scale=scale,
        pairs=loss_config.pairs,
        within_weight=loss_config.within_weight,
        cross_weight=loss_config.cross_weight,
    )
    return loss, {**aux, "target_scale": jnp.asarray(scale, jnp.float32)}


def _isimed(outputs, batch, loss_config):
    """The distance loss on the encoder embeddings or, with a projection head, on its output (as
    SimCLR's and VICReg's losses constrain their heads' outputs, leaving the encoder freer)."""
    z = outputs["z"]
    embeddings = outputs["p1"].reshape(*z.shape[:2], -1) if "p1" in outputs else z
    return _distance(embeddings, outputs, batch, loss_config)


def _simclr(outputs, batch, loss_config):
    del batch
    return losses.nt_xent_loss(outputs["p1"], outputs["p2"], temperature=loss_config.temperature)


def _vicreg(outputs, batch, loss_config):
    del batch
    return losses.vicreg_loss(
        outputs["p1"],
        outputs["p2"],
        sim_weight=loss_config.invariance_weight,
        var_weight=loss_config.variance_weight,
        cov_weight=loss_config.covariance_weight,
    )


def _barlow(outputs, batch, loss_config):
    del batch
    return losses.barlow_twins_loss(outputs["p1"], outputs["p2"], lambda_offdiag=loss_config.lambda_offdiag)


def _hybrid_ref(loss_config: ml_collections.ConfigDict) -> dict:
    # 0: not measured yet; the first step stores its terms.
    return {"isimed": jnp.float32(0), "vicreg": jnp.float32(0)} if loss_config.normalise else {}


def _isimed_vicreg(outputs, batch, loss_config):
    """Hybrid: `isimed_weight * ISImed(encoder embeddings) + vicreg_weight * VICReg(projections)`.

    With `normalise` (the default) each term is divided by its running mean (`loss_ref`, kept in
    the train state, so a resumed run divides by the same numbers): it starts at the term's value
    at the first step (both normalised terms start at 1), then follows
    `ref <- normalise_decay * ref + (1 - normalise_decay) * term` after each step. Each term then
    pulls with its relative gradient `grad(term) / term`, whatever its units, and the weights set
    the balance. `normalise_decay = 1` keeps the step-0 values; the distance loss's step-0 value is
    set by the random initial embedding scale (tens of times its trained value), so the distance
    term then pulls too weakly. Unnormalised, VICReg's terms (weights 25/25/1, about 20 in a demo
    run) are tens of times the distance loss (about 0.6) and swamp it.
    """
    distance, distance_aux = _distance(outputs["z"], outputs, batch, loss_config)
    vicreg, vicreg_aux = _vicreg(outputs, batch, loss_config)
    aux = {"isimed": distance, "vicreg": vicreg, **distance_aux, **vicreg_aux}
    if loss_config.normalise:
        decay = loss_config.normalise_decay
        ref, new_ref = {}, {}
        for name, value in (("isimed", distance), ("vicreg", vicreg)):
            stored = outputs["loss_ref"][name]
            # Floored: a term that is exactly 0 cannot be a divisor.
            value = jax.lax.stop_gradient(jnp.maximum(value, 1e-12))
            ref[name] = jnp.where(stored > 0, stored, value)
            new_ref[name] = decay * ref[name] + (1.0 - decay) * value
        distance, vicreg = distance / ref["isimed"], vicreg / ref["vicreg"]
        aux["loss_ref"] = new_ref
    loss = loss_config.isimed_weight * distance + loss_config.vicreg_weight * vicreg
    return loss, aux


_ISIMED_DEFAULTS = {
    "scale": 100.0,  # mm; target distance = physical distance / scale.
    # "within" an image, or "all" (adds cross-image pairs, meaningful when subjects share one
    # world frame); None: follow `data.shared_frame` (`loss_config`).
    "pairs": None,
    "within_weight": 1.0,
    "cross_weight": 1.0,
    "learnable_scale": False,
}
_VICREG_DEFAULTS = {"invariance_weight": 25.0, "variance_weight": 25.0, "covariance_weight": 1.0}
_VICREG_TERMS = ("invariance", "variance", "covariance")

METHODS = {
    m.name: m
    for m in (
        Method(
            "isimed",
            _isimed,
            ("within", "cross"),
            _ISIMED_DEFAULTS,
            last_terms=("target_scale",),
            init_params=_isimed_params,
        ),
        Method(
            "simclr",
            _simclr,
            ("positive_accuracy",),
            {"temperature": 0.1},
            views=2,
            head_dims=_SIMCLR_PROJECTOR,
        ),
        Method("vicreg", _vicreg, _VICREG_TERMS, _VICREG_DEFAULTS, views=2, head_dims=_EXPANDER),
        Method(
            "barlow",
            _barlow,
            ("on_diagonal", "off_diagonal"),
            {"lambda_offdiag": 0.0051},
            views=2,
            head_dims=_EXPANDER,
        ),
        Method(
            "isimed_vicreg",
            _isimed_vicreg,
            ("isimed", "vicreg", "within", "cross", *_VICREG_TERMS),
            # Terms normalised by their running means (about the last 100 steps); docs/results.md: the
            # trade-off over vicreg_weight.
            {
                **_VICREG_DEFAULTS,
                **_ISIMED_DEFAULTS,
                "normalise": True,
                "normalise_decay": 0.99,
                "isimed_weight": 1.0,
                "vicreg_weight": 1.0,
            },
            views=2,
            head_dims=_EXPANDER,
            last_terms=("target_scale",),
            init_params=_isimed_params,
            init_loss_ref=_hybrid_ref,
        ),
    )
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]


def uses_head(config: ml_collections.ConfigDict) -> bool:
    """Whether the config trains an MLP head on the encoder (`config.model.head_dims` set)."""
    return bool(config.model.get("head_dims"))


def configure(
    config: ml_collections.ConfigDict, name: str, preset: str, *, head: bool = False
) -> ml_collections.ConfigDict:
    """Sets `config.method`, `config.loss` and, per the method, the head sizes and augmentations;
    `head`: a one-view method's loss on a projection head (`ISIMED_HEAD`).

    `config.data.crops_per_image` stays the number of crops through the encoder per image for
    every method; the pipeline samples `crops_per_image // views` positions, `views` crops each.
    """
    method = get(name)
    config.method = name
    config.loss = ml_collections.ConfigDict(dict(method.defaults))
    if "pairs" in config.loss:
        config.loss.pairs = ml_collections.config_dict.placeholder(str)
    if method.head_dims is not None:
        config.model.head_dims = method.head_dims[preset]
    elif head:
        config.model.head_dims = ISIMED_HEAD[preset]
    if method.views == 2:
        config.augment = augment.default_config()
    if name == "isimed_vicreg":
        # No flips: the distance loss sees the augmented first view, and a flipped crop of one side
        # of the body looks like an unflipped crop of the other, so flips teach the encoder to
        # forget laterality (with flips, demo runs stayed at ~30 mm position error at every VICReg
        # weight).
        config.augment.flip_prob = 0.0
    return config


def loss_config(config: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """`config.loss` as the loss takes it: `pairs` unset (None) follows the data, "all" pairs where
    the subjects share one world frame (`data.shared_frame`), else "within" images."""
    loss = config.loss
    if "pairs" in loss and loss.pairs is None:
        loss = ml_collections.ConfigDict(loss.to_dict())
        loss.pairs = "all" if shared_frame(config) else "within"
    return loss


def shared_frame(config: ml_collections.ConfigDict) -> bool:
    """Whether the pretraining data's subjects share one world frame (`data.shared_frame`), so that
    distances between crops of different subjects mean something; configs stored before the field
    existed count as not sharing one (only within-image claims are made for them)."""
    return bool(config.data.get("shared_frame", False))
