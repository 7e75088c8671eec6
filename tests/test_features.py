"""Frozen-encoder features: the embedding and the pooled backbone features of a checkpoint."""

import numpy as np

from isimed.evaluation import features as features_lib


def test_backbone_features_give_the_embeddings_through_the_final_linear(pretrained):
    """Linear evaluation's `*_backbone` feature sets are the inputs of the encoder's final Linear:
    the restored head maps them onto the `pretrained` embeddings (numpy reference)."""
    config, embeds, state = features_lib.load_embed_fns(pretrained[0], backbone=True)
    assert set(embeds) == {"pretrained", "random_init", "pretrained_backbone", "random_init_backbone"}
    shape = (6, *config.data.crop_size, 1)
    crops = np.random.default_rng(0).uniform(-1, 1, shape).astype(np.float32)
    pooled, z = embeds["pretrained_backbone"](crops), embeds["pretrained"](crops)
    head = state["params"]["encoder"]["head"]
    assert pooled.shape == (6, head["kernel"].shape[0]) and z.shape == (6, config.model.embed_dim)
    np.testing.assert_allclose(
        z, pooled @ np.asarray(head["kernel"]) + np.asarray(head["bias"]), rtol=1e-4, atol=1e-5
    )
    # The random-init backbone is another encoder's: different features for the same crops.
    assert not np.allclose(embeds["random_init_backbone"](crops), pooled, atol=1e-3)
    assert set(features_lib.load_embed_fns(pretrained[0])[1]) == {"pretrained", "random_init"}
