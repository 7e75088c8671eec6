"""Registry of pretraining methods: what the pipeline samples and the loss on embeddings.

The training loop asks a method for one thing: `loss(embeddings (B, K, D), batch, loss_config,
scale) -> (loss, aux)` where `aux` holds the scalars to log.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from isimed import losses


@dataclasses.dataclass(frozen=True)
class Method:
    name: str
    loss: Callable


def _isimed(embeddings, batch, loss_config, scale):
    return losses.isimed_loss(
        embeddings,
        batch["centres"],
        scale=scale,
        pairs=loss_config.pairs,
        within_weight=loss_config.within_weight,
        cross_weight=loss_config.cross_weight,
    )


METHODS = {"isimed": Method("isimed", _isimed)}


def get(name: str) -> Method:
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; known: {sorted(METHODS)}")
    return METHODS[name]
