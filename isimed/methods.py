"""Registry of pretraining methods: what the pipeline samples, whether a head is trained, the loss.

A method is nothing but a sampling spec plus a loss; the one training loop (`isimed.train`) serves
them all. The loop calls

    loss(outputs, batch, loss_config, scale) -> (loss, aux)

with `outputs["z"]` the encoder embeddings `(B, K, D)` of the first view and, for two-view
methods, `outputs["p1"]`, `outputs["p2"]` the head's projections `(B*K, P)` of both views
(augmented on device). `aux` holds the unweighted loss terms to log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from isimed import losses


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: Callable
    terms: tuple[str, ...]  # The keys of `aux`, logged every step.
    views: int = 1  # 2: the pipeline samples a shifted second crop, both views are augmented.
    head: bool = False  # A projection / expander MLP (`config.model.head_dims`) feeds the loss.


def _isimed(outputs, batch, loss_config, scale):
    return losses.isimed_loss(
        outputs["z"],
        batch["centres"],
        scale=scale,
        pairs=loss_config.pairs,
        within_weight=loss_config.within_weight,
        cross_weight=loss_config.cross_weight,
    )


def _simclr(outputs, batch, loss_config, scale):
    del batch, scale
    return losses.nt_xent_loss(outputs["p1"], outputs["p2"], temperature=loss_config.temperature)


def _vicreg(outputs, batch, loss_config, scale):
    del batch, scale
    return losses.vicreg_loss(
        outputs["p1"], outputs["p2"],
        sim_weight=loss_config.invariance_weight,
        var_weight=loss_config.variance_weight,
        cov_weight=loss_config.covariance_weight,
    )


def _barlow(outputs, batch, loss_config, scale):
    del batch, scale
    return losses.barlow_twins_loss(
        outputs["p1"], outputs["p2"], lambda_offdiag=loss_config.lambda_offdiag
    )


def _isimed_vicreg(outputs, batch, loss_config, scale):
    """Hybrid: `isimed_weight * ISImed(encoder embeddings) + vicreg_weight * VICReg(projections)`."""
    distance, distance_aux = _isimed(outputs, batch, loss_config, scale)
    vicreg, vicreg_aux = _vicreg(outputs, batch, loss_config, scale)
    loss = loss_config.isimed_weight * distance + loss_config.vicreg_weight * vicreg
    return loss, {"isimed": distance, "vicreg": vicreg, **distance_aux, **vicreg_aux}


_VICREG_TERMS = ("invariance", "variance", "covariance")

METHODS = {
    m.name: m
    for m in (
        Method("isimed", _isimed, ("within", "cross")),
        Method("simclr", _simclr, ("positive_accuracy",), views=2, head=True),
        Method("vicreg", _vicreg, _VICREG_TERMS, views=2, head=True),
        Method("barlow", _barlow, ("on_diagonal", "off_diagonal"), views=2, head=True),
        Method("isimed_vicreg", _isimed_vicreg, ("isimed", "vicreg", "within", "cross", *_VICREG_TERMS),
               views=2, head=True),
    )
}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
