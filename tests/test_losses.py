import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isimed import losses


def reference_isimed(z, p, scale, pairs, w_within, w_cross):
    """Brute force over unordered pairs, straight from the formula.

    Mean over i<j of (|z_i - z_j| - |p_i - p_j| / scale)^2.
    """
    b, k = z.shape[:2]
    z = z.reshape(b * k, -1).astype(np.float64)
    p = p.reshape(b * k, -1).astype(np.float64)
    within, cross = [], []
    for i in range(b * k):
        for j in range(i + 1, b * k):
            e = (np.linalg.norm(z[i] - z[j]) - np.linalg.norm(p[i] - p[j]) / scale) ** 2
            (within if i // k == j // k else cross).append(e)
    cross_mean = np.mean(cross) if cross else 0.0  # B = 1 has no cross-image pairs.
    loss = w_within * np.mean(within)
    if pairs == "all":
        loss += w_cross * cross_mean
    return loss, np.mean(within), cross_mean


@pytest.mark.parametrize("pairs", ["within", "all"])
@pytest.mark.parametrize("b,k,d", [(1, 5, 3), (3, 4, 16), (4, 6, 64)])
def test_isimed_loss_matches_brute_force(pairs, b, k, d):
    rng = np.random.default_rng(b * 100 + k)
    z = rng.normal(size=(b, k, d)).astype(np.float32)
    p = rng.uniform(-150, 150, size=(b, k, 3)).astype(np.float32)
    loss, aux = losses.isimed_loss(z, p, scale=100.0, pairs=pairs, within_weight=0.7, cross_weight=1.3)
    ref, ref_within, ref_cross = reference_isimed(z, p, 100.0, pairs, 0.7, 1.3)
    np.testing.assert_allclose(loss, ref, rtol=2e-5)
    np.testing.assert_allclose(aux["within"], ref_within, rtol=2e-5)
    np.testing.assert_allclose(aux["cross"], ref_cross, rtol=2e-5, atol=1e-7)


def test_pairwise_distances_brute_force_and_exact_zero_diagonal():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(9, 5)).astype(np.float32) + 10.0  # Offset: cancellation-prone.
    ref = np.linalg.norm(x[:, None].astype(np.float64) - x[None].astype(np.float64), axis=-1)
    d = losses.pairwise_distances(jnp.asarray(x))
    np.testing.assert_allclose(d, ref, atol=2e-5)
    assert np.all(np.diag(np.asarray(d)) == 0)


@pytest.mark.parametrize("pairs", ["within", "all"])
def test_gradient_finite_when_embeddings_coincide(pairs):
    z = jnp.ones((2, 4, 8))
    z = z.at[0, 1].set(z[0, 0])  # Duplicates within and across images.
    p = jnp.asarray(np.random.default_rng(1).normal(size=(2, 4, 3)) * 50, jnp.float32)

    def f(z):
        return losses.isimed_loss(z, p, scale=100.0, pairs=pairs)[0]

    value, grad = jax.value_and_grad(f)(z)
    assert np.isfinite(value)
    assert np.all(np.isfinite(grad))
    # Also when every embedding and every centre coincide.
    _, grad = jax.value_and_grad(
        lambda z: losses.isimed_loss(z, jnp.zeros((2, 4, 3)), scale=1.0, pairs=pairs)[0]
    )(jnp.zeros((2, 4, 8)))
    assert np.all(np.isfinite(grad))


def test_invariant_to_permuting_crops():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(3, 5, 7)).astype(np.float32)
    p = rng.normal(size=(3, 5, 3)).astype(np.float32) * 80
    base = losses.isimed_loss(z, p, scale=50.0, pairs="all")[0]
    # Permute crops within each image, and the order of images.
    perm_k = rng.permutation(5)
    perm_b = rng.permutation(3)
    permuted = losses.isimed_loss(z[perm_b][:, perm_k], p[perm_b][:, perm_k], scale=50.0, pairs="all")[0]
    np.testing.assert_allclose(base, permuted, rtol=1e-5)


def test_zero_when_embeddings_are_scaled_centres():
    rng = np.random.default_rng(3)
    p = rng.uniform(-200, 200, size=(2, 6, 3)).astype(np.float32)
    z = np.concatenate([p / 100.0, np.zeros((2, 6, 13), np.float32)], axis=-1)
    loss, aux = losses.isimed_loss(z, p, scale=100.0, pairs="all")
    assert float(loss) < 1e-9
    # And clearly non-zero when the scale is wrong.
    assert float(losses.isimed_loss(z, p, scale=50.0, pairs="all")[0]) > 0.1


def test_bad_pairs_option():
    with pytest.raises(ValueError, match="pairs"):
        losses.isimed_loss(jnp.zeros((1, 2, 3)), jnp.zeros((1, 2, 3)), scale=1.0, pairs="both")
