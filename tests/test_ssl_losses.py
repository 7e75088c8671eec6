import jax
import jax.numpy as jnp
import numpy as np
import pytest

from isimed import losses

# --- Brute-force float64 references, straight from the formulas -----------------------------------


def reference_nt_xent(z1, z2, temperature):
    z = np.concatenate([z1, z2]).astype(np.float64)
    n2 = len(z)
    z = [row / np.linalg.norm(row) for row in z]
    total, correct = 0.0, 0
    for i in range(n2):
        pos = (i + n2 // 2) % n2
        sims = {j: float(z[i] @ z[j]) / temperature for j in range(n2) if j != i}
        denominator = sum(np.exp(s) for s in sims.values())
        total += -np.log(np.exp(sims[pos]) / denominator)
        correct += max(sims, key=sims.get) == pos
    return total / n2, correct / n2


def reference_vicreg(z1, z2, sim_w, var_w, cov_w, eps):
    z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
    n, d = z1.shape
    invariance = sum((z1[i, k] - z2[i, k]) ** 2 for i in range(n) for k in range(d)) / (n * d)
    variance, covariance = 0.0, 0.0
    for z in (z1, z2):
        means = [sum(z[:, k]) / n for k in range(d)]
        stds = [np.sqrt(sum((z[i, k] - means[k]) ** 2 for i in range(n)) / (n - 1) + eps) for k in range(d)]
        variance += sum(max(0.0, 1.0 - s) for s in stds) / d / 2
        for a in range(d):
            for b in range(d):
                if a != b:
                    c = sum((z[i, a] - means[a]) * (z[i, b] - means[b]) for i in range(n)) / (n - 1)
                    covariance += c**2 / d
    loss = sim_w * invariance + var_w * variance + cov_w * covariance
    return loss, invariance, variance, covariance


def reference_barlow(z1, z2, lam, eps):
    z1, z2 = z1.astype(np.float64), z2.astype(np.float64)
    n, d = z1.shape

    def standardise(z):
        out = np.empty_like(z)
        for k in range(d):
            col = z[:, k] - z[:, k].mean()
            out[:, k] = col / np.sqrt((col**2).mean() + eps)  # Batch-norm: biased var + eps.
        return out

    a, b = standardise(z1), standardise(z2)
    on, off = 0.0, 0.0
    for i in range(d):
        for j in range(d):
            c = sum(a[r, i] * b[r, j] for r in range(n)) / n
            if i == j:
                on += (1 - c) ** 2
            else:
                off += c**2
    return on + lam * off, on, off


def two_views(seed, n, d, noise=0.7):
    rng = np.random.default_rng(seed)
    z1 = rng.normal(size=(n, d)).astype(np.float32)
    z2 = (z1 + noise * rng.normal(size=(n, d))).astype(np.float32)
    return z1, z2


# --- Agreement with the references ------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.5, 0.1, 0.05])
@pytest.mark.parametrize("n,d", [(2, 3), (6, 8), (12, 5)])
def test_nt_xent_matches_brute_force(temperature, n, d):
    z1, z2 = two_views(n * 10 + d, n, d)
    z1 *= np.float32(3.0)  # Norms differ between views; normalisation must remove them.
    loss, aux = jax.jit(losses.nt_xent_loss, static_argnums=2)(z1, z2, temperature)
    want, acc = reference_nt_xent(z1, z2, temperature)
    # Tiny losses (n = 2) are differences of logits ~1/temperature: float32 resolves them absolutely.
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7 / temperature)
    np.testing.assert_allclose(aux["positive_accuracy"], acc, rtol=1e-6)


@pytest.mark.parametrize("weights", [(25.0, 25.0, 1.0), (1.0, 3.0, 0.5)])
# scale 0.01: var ~ eps, so where eps enters (inside the sqrt) matters.
@pytest.mark.parametrize("n,d,scale", [(4, 3, 1.0), (10, 6, 0.3), (7, 5, 2.5), (8, 4, 0.01)])
def test_vicreg_matches_brute_force(weights, n, d, scale):
    z1, z2 = two_views(n * 10 + d, n, d)
    z1, z2 = z1 * np.float32(scale), z2 * np.float32(scale)  # 0.3: variance term active.
    sim_w, var_w, cov_w = weights
    fn = jax.jit(lambda a, b: losses.vicreg_loss(a, b, sim_weight=sim_w, var_weight=var_w, cov_weight=cov_w))
    loss, aux = fn(z1, z2)
    want, inv, var, cov = reference_vicreg(z1, z2, sim_w, var_w, cov_w, 1e-4)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["invariance"], inv, rtol=1e-5)
    np.testing.assert_allclose(aux["variance"], var, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(aux["covariance"], cov, rtol=1e-5)
    if scale == 0.3:
        assert aux["variance"] > 0.3


@pytest.mark.parametrize("lam", [0.0051, 0.5])
# scale 3e-3: var ~ eps, which pins the batch-norm convention sqrt(var + eps).
@pytest.mark.parametrize("n,d,scale", [(4, 3, 4.0), (10, 6, 4.0), (9, 12, 4.0), (8, 5, 3e-3)])
def test_barlow_matches_brute_force(lam, n, d, scale):
    z1, z2 = two_views(n * 10 + d, n, d)
    z1 = z1 * np.float32(scale) + np.float32(2.0)  # Standardisation must remove scale and shift.
    loss, aux = jax.jit(lambda a, b: losses.barlow_twins_loss(a, b, lambda_offdiag=lam))(z1, z2)
    want, on, off = reference_barlow(z1, z2, lam, 1e-5)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(aux["on_diagonal"], on, rtol=1e-5)
    np.testing.assert_allclose(aux["off_diagonal"], off, rtol=1e-5)


def test_losses_cast_low_precision_inputs_to_float32():
    z1, z2 = two_views(0, 8, 6)
    for fn in (losses.nt_xent_loss, losses.vicreg_loss, losses.barlow_twins_loss):
        fn = jax.jit(fn)  # Eager op-by-op dispatch is slower than one compile here.
        loss16, _ = fn(jnp.asarray(z1, jnp.bfloat16), jnp.asarray(z2, jnp.bfloat16))
        loss32, _ = fn(
            jnp.asarray(z1, jnp.bfloat16).astype(jnp.float32),
            jnp.asarray(z2, jnp.bfloat16).astype(jnp.float32),
        )
        assert loss16.dtype == jnp.float32
        np.testing.assert_allclose(loss16, loss32, rtol=1e-6)


# --- Stability and limiting cases ------------------------------------------------------------------


def test_nt_xent_stable_at_low_temperature():
    rng = np.random.default_rng(1)
    z1 = rng.normal(size=(16, 32)).astype(np.float32)
    z2 = np.float32(1e3) * z1  # Same direction, so cos = 1 and logits reach 1/temperature = 100.
    fn = jax.jit(lambda a, b: losses.nt_xent_loss(a, b, temperature=0.01))
    (loss, aux), grads = jax.jit(jax.value_and_grad(fn, argnums=(0, 1), has_aux=True))(z1, z2)
    assert np.isfinite(loss) and loss >= 0
    assert all(np.isfinite(g).all() for g in grads)
    # Random 32-d directions are far apart, so identical views are always found.
    assert aux["positive_accuracy"] == 1.0
    # A naive softmax (exp(100) summed in float32) would overflow; check the value too.
    want, _ = reference_nt_xent(z1, z2, 0.01)
    np.testing.assert_allclose(loss, want, rtol=1e-4, atol=1e-6)


def test_nt_xent_zero_vectors_finite_and_mismatched_views_low_accuracy():
    rng = np.random.default_rng(2)
    z = rng.normal(size=(8, 16)).astype(np.float32)
    z[0] = 0.0  # A dead projection must not turn the loss or its gradient into NaN.
    (loss, _), grad = jax.jit(jax.value_and_grad(losses.nt_xent_loss, has_aux=True))(z, z)
    assert np.isfinite(loss) and np.isfinite(grad).all()
    # Second view of a different crop: positives no longer stand out.
    _, aux = jax.jit(losses.nt_xent_loss)(z[1:], rng.normal(size=(7, 16)).astype(np.float32))
    assert aux["positive_accuracy"] < 0.5


def test_vicreg_collapse_gives_unit_variance_term_and_finite_gradient():
    eps = 1e-4
    row = np.random.default_rng(3).normal(size=(1, 10)).astype(np.float32)
    z = np.repeat(row, 6, axis=0)  # Every row equal: std = sqrt(0 + eps) in every dimension.
    (loss, aux), grads = jax.jit(jax.value_and_grad(losses.vicreg_loss, argnums=(0, 1), has_aux=True))(z, z)
    # Reference convention: mean_d relu(1 - sqrt(eps)) / 2 per branch, i.e. 1 up to sqrt(eps).
    np.testing.assert_allclose(aux["variance"], 1.0 - np.sqrt(eps), rtol=1e-6)
    np.testing.assert_allclose(aux["variance"], 1.0, atol=2 * np.sqrt(eps))
    assert aux["invariance"] == 0.0 and aux["covariance"] < 1e-12
    np.testing.assert_allclose(loss, 25.0 * (1.0 - np.sqrt(eps)), rtol=1e-6)
    assert all(np.isfinite(g).all() for g in grads)


def hadamard(n):
    h = np.ones((1, 1))
    while len(h) < n:
        h = np.block([[h, h], [h, -h]])
    return h


def test_barlow_near_zero_for_identical_standardised_uncorrelated_features():
    # Columns 1.. of a Hadamard matrix: mean 0, biased std 1, mutually orthogonal.
    z = (hadamard(16)[:, 1:] * 2.0 + 5.0).astype(np.float32)
    barlow = jax.jit(losses.barlow_twins_loss)
    loss, aux = barlow(z, z)
    assert loss < 1e-8, loss  # (1 - 1 / (1 + eps))^2 * 15 ~ 1.5e-9.
    assert aux["off_diagonal"] < 1e-10
    # Correlated features are penalised off the diagonal, and a different second view on it.
    mixed = z.copy()
    mixed[:, 1] = z[:, 0] + z[:, 1]
    assert barlow(mixed, mixed)[1]["off_diagonal"] > 0.9  # 2 * corr^2 = 2 * (1/sqrt 2)^2.
    assert barlow(z, z[::-1].copy())[1]["on_diagonal"] > 1.0


def test_embedding_std_detects_collapse():
    rng = np.random.default_rng(4)
    z = rng.normal(size=(256, 16)).astype(np.float32)
    healthy = jax.jit(losses.embedding_std)(z)
    np.testing.assert_allclose(healthy, 1.0 / np.sqrt(16), rtol=0.1)
    scaled_rows = rng.uniform(0.5, 5.0, size=(256, 1)).astype(np.float32) * z[:1]
    np.testing.assert_allclose(jax.jit(losses.embedding_std)(scaled_rows), 0.0, atol=1e-6)  # Norm-invariant.
    want = np.mean(np.std(z / np.linalg.norm(z, axis=1, keepdims=True), axis=0))
    np.testing.assert_allclose(healthy, want, rtol=1e-5)


# --- Global batch: same values on 1 and 8 devices -------------------------------------------------


def test_one_device_equals_eight_devices(run_on_devices):
    one = run_on_devices("tests/ssl_sharding_check.py", 1)
    eight = run_on_devices("tests/ssl_sharding_check.py", 8)
    assert int(one.pop("devices")) == 1 and int(eight.pop("devices")) == 8
    assert one.keys() == eight.keys() and len(one) == 16
    for key in one:
        # Gradient entries near zero are float noise, so atol is relative to the largest entry.
        atol = 1e-6 * np.abs(one[key]).max() if key.endswith(("grad_z1", "grad_z2")) else 0.0
        np.testing.assert_allclose(eight[key], one[key], rtol=1e-5, atol=atol, err_msg=key)
