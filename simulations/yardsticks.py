"""Closed-form and alternating-least-squares recommenders: the centralized yardsticks people reach for.

EASE (Steck, WWW 2019) is an item-item model with a closed form; implicit-feedback ALS
(Hu, Koren & Volinsky, ICDM 2008) is matrix factorization with a confidence weight on
observed items, solved here with a few conjugate-gradient steps per sweep (Takacs, Pilaszy
& Tikk, RecSys 2011; what the ``implicit`` package does by default), vectorized over all
users (or items) at once with numpy and scipy. Both read only the binary training matrix.
"""

from __future__ import annotations

import numpy as np
from scipy import sparse

from common import ease
from common.als import ALS_ALPHA, ALS_REGULARIZATION
from common.ease import EASE_LAMBDA, EASE_MAX_ITEMS  # defined with the federated EASE, which solves the same

# ALS defaults: the best validation HR@10 on MovieLens-100K's validation split among
# factors 16/32/48/64, alpha 2/3/5/10, regularization 0.1/1 (never the test split).
ALS_FACTORS = 32
# Regularization and alpha (confidence 1 + alpha of an observed item) are defined with the
# federated ALS, which solves the same objective (common/als.py).
ALS_ITERATIONS = 15
ALS_CG_STEPS = 3
_PAIR_CHUNK = 1 << 18  # (user, item) dot products (or cells of a dense block) computed at once
_DENSE_PRODUCT_DENSITY = 64  # dense blocks when at least one cell in this many is stored


def interaction_matrix(users: np.ndarray, items: np.ndarray, num_users: int, num_items: int) -> sparse.csr_matrix:
    """Binary users x items matrix of the training interactions (repeats count once)."""
    data = np.ones(len(users), np.float32)
    matrix = sparse.csr_matrix((data, (users, items)), shape=(num_users, num_items))
    matrix.sum_duplicates()
    matrix.data[:] = 1.0
    return matrix


def ease_weights(matrix: sparse.csr_matrix, lam: float = EASE_LAMBDA) -> np.ndarray:
    """EASE's item-item weights from the binary training matrix (:func:`common.ease.ease_weights`), float32."""
    if matrix.shape[1] > EASE_MAX_ITEMS:
        raise ValueError(f"EASE inverts an items x items matrix: {matrix.shape[1]} items is more than {EASE_MAX_ITEMS}")
    return ease.ease_weights((matrix.T @ matrix).toarray(), lam).astype(np.float32)


def _pair_dots(left: np.ndarray, right: np.ndarray, matrix: sparse.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """``left[u] . right[i]`` for every stored (u, i) of ``matrix`` (``rows``: the row of each entry).

    Dense enough (MovieLens: 4-6% of cells), blocks of ``left @ right.T`` through BLAS beat
    gathering two vectors per entry; sparse data gathers, in chunks (bounded memory).
    """
    out = np.empty(matrix.nnz, left.dtype)
    cols, indptr = matrix.indices, matrix.indptr
    if matrix.nnz * _DENSE_PRODUCT_DENSITY >= matrix.shape[0] * matrix.shape[1]:
        step = max(1, _PAIR_CHUNK // max(1, matrix.shape[1]))
        for start in range(0, matrix.shape[0], step):
            stop = min(start + step, matrix.shape[0])
            block = left[start:stop] @ right.T
            a, b = indptr[start], indptr[stop]
            out[a:b] = block[rows[a:b] - start, cols[a:b]]
        return out
    for start in range(0, matrix.nnz, _PAIR_CHUNK):
        r, c = rows[start : start + _PAIR_CHUNK], cols[start : start + _PAIR_CHUNK]
        out[start : start + len(r)] = np.einsum("nf,nf->n", left[r], right[c])
    return out


def als_half_step(
    matrix: sparse.csr_matrix, fixed: np.ndarray, solved: np.ndarray, reg: float, alpha: float, cg_steps: int
) -> np.ndarray:
    """New rows for ``solved`` (one per row of ``matrix``) with ``fixed`` held, by conjugate gradient.

    Row u solves ``(Y^T Y + alpha Y_u^T Y_u + reg I) x_u = (1 + alpha) Y_u^T 1``, Y = ``fixed``
    and Y_u its rows observed by u: the implicit-feedback least squares with confidence
    1 + alpha on observed entries and 1 (preference 0) elsewhere. Warm-started at ``solved``.
    """
    rows = np.repeat(np.arange(matrix.shape[0]), np.diff(matrix.indptr))
    cols = matrix.indices
    gram = fixed.T @ fixed + reg * np.eye(fixed.shape[1], dtype=fixed.dtype)

    def apply(x: np.ndarray) -> np.ndarray:
        weights = alpha * _pair_dots(x, fixed, matrix, rows)
        return x @ gram + sparse.csr_matrix((weights, cols, matrix.indptr), shape=matrix.shape) @ fixed

    x = solved.copy()
    residual = (1.0 + alpha) * (matrix @ fixed) - apply(x)
    direction = residual.copy()
    norm = np.einsum("nf,nf->n", residual, residual)
    for _ in range(cg_steps):
        active = norm > 1e-20
        if not active.any():
            break
        product = apply(direction)
        curvature = np.einsum("nf,nf->n", direction, product)
        step = np.where(active, norm / np.where(active, curvature, 1.0), 0.0).astype(x.dtype)
        x += step[:, None] * direction
        residual -= step[:, None] * product
        new_norm = np.einsum("nf,nf->n", residual, residual)
        direction = residual + np.where(active, new_norm / np.where(active, norm, 1.0), 0.0)[:, None] * direction
        norm = new_norm
    return x


def als_init(num_users: int, num_items: int, factors: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Small random user and item factors (float32)."""
    rng = np.random.default_rng(seed)
    scale = 0.01
    return (rng.standard_normal((num_users, factors)) * scale).astype(np.float32), \
        (rng.standard_normal((num_items, factors)) * scale).astype(np.float32)


def als_sweep(
    matrix: sparse.csr_matrix, transposed: sparse.csr_matrix, user_factors: np.ndarray, item_factors: np.ndarray,
    reg: float = ALS_REGULARIZATION, alpha: float = ALS_ALPHA, cg_steps: int = ALS_CG_STEPS,
) -> tuple[np.ndarray, np.ndarray]:
    """One ALS iteration: users given items, then items given the new users."""
    user_factors = als_half_step(matrix, item_factors, user_factors, reg, alpha, cg_steps)
    item_factors = als_half_step(transposed, user_factors, item_factors, reg, alpha, cg_steps)
    return user_factors, item_factors


def als_exact_rows(matrix: sparse.csr_matrix, fixed: np.ndarray, reg: float = ALS_REGULARIZATION,
                   alpha: float = ALS_ALPHA) -> np.ndarray:
    """Every row of ``matrix`` solved exactly (float64), the system :func:`als_half_step` approaches by CG.

    Row u: ``(F^T F + alpha F_u^T F_u + reg I) x_u = (1 + alpha) F_u^T 1``, F = ``fixed``. One dense
    solve per row: the reference the federated ALS (devices solve their own row) is checked against.
    """
    fixed = np.asarray(fixed, np.float64)
    gram = fixed.T @ fixed + reg * np.eye(fixed.shape[1])
    out = np.zeros((matrix.shape[0], fixed.shape[1]))
    for row in range(matrix.shape[0]):
        sub = fixed[matrix.indices[matrix.indptr[row] : matrix.indptr[row + 1]]]
        out[row] = np.linalg.solve(gram + alpha * sub.T @ sub, (1.0 + alpha) * sub.sum(axis=0))
    return out


def als_exact_sweep(
    matrix: sparse.csr_matrix, transposed: sparse.csr_matrix, item_factors: np.ndarray,
    reg: float = ALS_REGULARIZATION, alpha: float = ALS_ALPHA,
) -> tuple[np.ndarray, np.ndarray]:
    """One exact ALS iteration from ``item_factors``: users solved, then items given those users."""
    user_factors = als_exact_rows(matrix, item_factors, reg, alpha)
    return user_factors, als_exact_rows(transposed, user_factors, reg, alpha)
