"""Losses on embeddings (pure jnp functions, always computed in float32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp


def safe_sqrt(sq: jnp.ndarray) -> jnp.ndarray:
    """sqrt with a zero (not infinite) gradient at 0, so identical embeddings give finite grads."""
    positive = sq > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, sq, 1.0)), 0.0)


def pairwise_distances(x: jnp.ndarray) -> jnp.ndarray:
    """Euclidean distances `(n, n)` between rows of `x` `(n, d)`, with a safe gradient.

    Uses the Gram form (memory n^2, not n^2 d) on mean-centred rows, which keeps the cancellation
    error of |a|^2 + |b|^2 - 2ab small; the diagonal is exactly 0.
    """
    x = x.astype(jnp.float32)
    x = x - jnp.mean(x, axis=0, keepdims=True)
    sq_norms = jnp.sum(x * x, axis=-1)
    sq = sq_norms[:, None] + sq_norms[None, :] - 2.0 * (x @ x.T)
    sq = jnp.maximum(sq, 0.0) * (1.0 - jnp.eye(x.shape[0], dtype=x.dtype))
    return safe_sqrt(sq)


def physical_distances(points: jnp.ndarray) -> jnp.ndarray:
    """Exact distances `(n, n)` between low-dimensional points (mm); difference form is cheap here."""
    points = points.astype(jnp.float32)
    diff = points[:, None, :] - points[None, :, :]
    return safe_sqrt(jnp.sum(diff * diff, axis=-1))


def pair_masks(num_images: int, crops_per_image: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Upper-triangle (i < j) masks of within-image and cross-image pairs over B*K crops."""
    image = jnp.repeat(jnp.arange(num_images), crops_per_image)
    n = num_images * crops_per_image
    upper = jnp.triu(jnp.ones((n, n), dtype=bool), k=1)
    same = image[:, None] == image[None, :]
    return upper & same, upper & ~same


def isimed_loss(
    embeddings: jnp.ndarray,
    centres_mm: jnp.ndarray,
    *,
    scale: float | jnp.ndarray,
    pairs: str,
    within_weight: float = 1.0,
    cross_weight: float = 1.0,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """ISImed distance loss.

    Args:
      embeddings: `(B, K, D)` embeddings of K crops from each of B images.
      centres_mm: `(B, K, ndim)` crop centres in world millimetres.
      scale: target distance = physical distance (mm) / scale.
      pairs: "within" uses pairs of crops from the same image; "all" adds cross-image pairs.
      within_weight, cross_weight: weights of the two pair classes. Each class is averaged over its
        own pairs, so the loss does not change with B and K.

    Returns:
      loss and `{"within": ..., "cross": ...}` (per-class mean squared errors; cross is 0 if B=1).
    """
    if pairs not in ("within", "all"):
        raise ValueError(f"pairs must be 'within' or 'all', got {pairs!r}")
    b, k = embeddings.shape[:2]
    latent = pairwise_distances(embeddings.reshape(b * k, -1))
    target = physical_distances(centres_mm.reshape(b * k, -1)) / scale
    err = jnp.square(latent - target)
    within_mask, cross_mask = pair_masks(b, k)

    def masked_mean(mask):
        return jnp.sum(jnp.where(mask, err, 0.0)) / jnp.maximum(jnp.sum(mask), 1)

    within, cross = masked_mean(within_mask), masked_mean(cross_mask)
    loss = within_weight * within
    if pairs == "all":
        loss = loss + cross_weight * cross
    return loss, {"within": within, "cross": cross}


# --- Self-supervised baseline losses (SimCLR, VICReg, Barlow Twins) --------------------------------
#
# All take the projections of two views, `(N, D)` each, over the *global* batch: under `jax.jit`
# with the batch axis sharded, the plain jnp reductions below make XLA gather what each needs, so
# the value does not depend on the number of devices.

# Floor on the L2 norm: zero vectors normalise to zero with a zero (not NaN) gradient.
_NORM_EPS = 1e-6
# The similarity matrices are tiny next to the encoder, so pay for full float32 matmuls; the
# accelerator default (TF32 / bf16 passes) would make the losses depend on the backend.
_HIGHEST = jax.lax.Precision.HIGHEST


def l2_normalize(z: jnp.ndarray, eps: float = _NORM_EPS) -> jnp.ndarray:
    """Rows of `z` scaled to unit L2 norm; rows with norm < eps are scaled by 1/eps instead."""
    z = z.astype(jnp.float32)
    sq = jnp.sum(z * z, axis=-1, keepdims=True)
    # Clamping the squared norm before rsqrt keeps the gradient finite at z = 0.
    return z * jax.lax.rsqrt(jnp.maximum(sq, eps * eps))


def nt_xent_loss(
    z1: jnp.ndarray, z2: jnp.ndarray, temperature: float = 0.1
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """SimCLR NT-Xent loss over the global batch.

    Rows are the 2N L2-normalised projections `[z1; z2]`; the positive of row i is the other view
    of the same crop (i + N or i - N), every other row except i itself is a negative. Each row's
    loss is the cross-entropy of softmax(cos-sim / temperature) against its positive; the loss is
    the mean over the 2N rows.

    Args:
      z1, z2: `(N, D)` projections of two views of the same N crops.
      temperature: softmax temperature (log-sum-exp keeps it stable down to ~0.01).

    Returns:
      loss and `{"positive_accuracy": share of the 2N rows whose positive is the most similar}`.
    """
    n = z1.shape[0]
    z = l2_normalize(jnp.concatenate([z1, z2], axis=0))
    logits = jnp.matmul(z, z.T, precision=_HIGHEST) / jnp.float32(temperature)
    # A large finite negative (not -inf) removes self-similarity from the softmax without any
    # inf - inf = NaN risk in the max-shift of log-sum-exp or in its gradient.
    self_mask = jnp.eye(2 * n, dtype=bool)
    logits = jnp.where(self_mask, jnp.float32(-1e9), logits)
    positive = jnp.concatenate([jnp.arange(n, 2 * n), jnp.arange(0, n)])
    positive_logit = jnp.take_along_axis(logits, positive[:, None], axis=1)[:, 0]
    loss = jnp.mean(jax.nn.logsumexp(logits, axis=1) - positive_logit)
    accuracy = jnp.mean((jnp.argmax(logits, axis=1) == positive).astype(jnp.float32))
    return loss, {"positive_accuracy": accuracy}


def _off_diagonal_sum_sq(m: jnp.ndarray) -> jnp.ndarray:
    """Sum of squared off-diagonal entries of a square matrix."""
    return jnp.sum(jnp.where(jnp.eye(m.shape[0], dtype=bool), 0.0, m * m))


def vicreg_loss(
    z1: jnp.ndarray,
    z2: jnp.ndarray,
    *,
    sim_weight: float = 25.0,
    var_weight: float = 25.0,
    cov_weight: float = 1.0,
    eps: float = 1e-4,
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """VICReg loss, following the convention of the paper's reference implementation.

    With `N` rows and `D` dimensions per branch:
      invariance = mean over N and D of (z1 - z2)^2;
      variance   = mean_d relu(1 - std1_d) / 2 + mean_d relu(1 - std2_d) / 2, where
                   std_d = sqrt(var(z[:, d], ddof=1) + eps) (the two branches are *averaged*, so a
                   fully collapsed batch gives 1 - sqrt(eps), i.e. 1 up to eps);
      covariance = sum_{i != j} C1_ij^2 / D + sum_{i != j} C2_ij^2 / D, where C is the ddof=1
                   covariance matrix `(D, D)` of one branch (the two branches are *summed*);
      loss       = sim_weight * invariance + var_weight * variance + cov_weight * covariance.

    Returns:
      loss and `{"invariance", "variance", "covariance"}` (unweighted terms).
    """
    z1 = z1.astype(jnp.float32)
    z2 = z2.astype(jnp.float32)
    n, d = z1.shape
    invariance = jnp.mean(jnp.square(z1 - z2))

    def var_and_cov(z):
        zc = z - jnp.mean(z, axis=0, keepdims=True)
        cov = jnp.matmul(zc.T, zc, precision=_HIGHEST) / (n - 1)
        # var(ddof=1) from the centred rows directly: eps keeps sqrt's gradient finite at collapse.
        std = jnp.sqrt(jnp.sum(zc * zc, axis=0) / (n - 1) + eps)
        return jnp.mean(jax.nn.relu(1.0 - std)), _off_diagonal_sum_sq(cov) / d

    var1, cov1 = var_and_cov(z1)
    var2, cov2 = var_and_cov(z2)
    variance = var1 / 2 + var2 / 2
    covariance = cov1 + cov2
    loss = sim_weight * invariance + var_weight * variance + cov_weight * covariance
    return loss, {"invariance": invariance, "variance": variance, "covariance": covariance}


def barlow_twins_loss(
    z1: jnp.ndarray, z2: jnp.ndarray, *, lambda_offdiag: float = 0.0051, eps: float = 1e-5
) -> tuple[jnp.ndarray, dict[str, jnp.ndarray]]:
    """Barlow Twins loss.

    Each branch is standardised over the batch as batch-norm without affine parameters does:
    (z - mean) / sqrt(var + eps) with the biased (ddof=0) variance. The cross-correlation is
    C = z1n^T z2n / N `(D, D)` and
      loss = sum_i (1 - C_ii)^2 + lambda_offdiag * sum_{i != j} C_ij^2.

    Returns:
      loss and `{"on_diagonal": sum_i (1 - C_ii)^2, "off_diagonal": sum_{i != j} C_ij^2}` (the
      off-diagonal term unweighted).
    """
    z1 = z1.astype(jnp.float32)
    z2 = z2.astype(jnp.float32)
    n = z1.shape[0]

    def standardise(z):
        zc = z - jnp.mean(z, axis=0, keepdims=True)
        return zc * jax.lax.rsqrt(jnp.mean(zc * zc, axis=0, keepdims=True) + eps)

    c = jnp.matmul(standardise(z1).T, standardise(z2), precision=_HIGHEST) / n
    on_diagonal = jnp.sum(jnp.square(1.0 - jnp.diagonal(c)))
    off_diagonal = _off_diagonal_sum_sq(c)
    loss = on_diagonal + lambda_offdiag * off_diagonal
    return loss, {"on_diagonal": on_diagonal, "off_diagonal": off_diagonal}


def embedding_std(z: jnp.ndarray) -> jnp.ndarray:
    """Collapse indicator: mean over dimensions of the per-dimension (biased) std of the
    L2-normalised rows of `z` `(N, D)`. 0 when all rows point the same way; about 1/sqrt(D) for
    isotropic embeddings."""
    return jnp.mean(jnp.std(l2_normalize(z), axis=0))


def rankme(z: jnp.ndarray, eps: float = 1e-7) -> jnp.ndarray:
    """RankMe (Garrido et al., 2023), the smooth effective rank of `z` `(N, D)`:
    `exp(-sum_k p_k log p_k)` with `p_k = s_k / sum(s) + eps` over the singular values `s`. Not
    centred, as in the paper. An all-zero matrix has no spectrum and gives 0."""
    s = jnp.linalg.svd(z.astype(jnp.float32), compute_uv=False)
    total = jnp.sum(s)
    p = s / jnp.where(total > 0, total, 1.0) + eps
    return jnp.where(total > 0, jnp.exp(-jnp.sum(p * jnp.log(p))), 0.0)
