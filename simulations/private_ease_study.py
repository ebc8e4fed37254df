"""Private EASE: EASE on one user-level-DP release of the item-item Gram, in one process.

The mechanism is exactly what a federated version would release, so this central numpy
simulation has the same output distribution. Each user keeps at most ``k_max`` of its
distinct training items (drawn at random on the device), forms the binary Gram ``x x^T``,
keeps its upper triangle including the diagonal as one vector (``k (k + 1) / 2`` ones for
``k`` kept items, L2 norm ``sqrt(k (k + 1) / 2)``) and scales it by ``w_u`` so that its norm
is at most ``C``. The server sums the vectors and adds ``N(0, (z C)^2)`` per coordinate, ``z``
calibrated by :mod:`common.privacy` for ONE release at sampling rate 1 (add or remove one
user). Everything after the release is post-processing and free in privacy: the PSD
projection, a vocabulary of the top-M items by the noisy diagonal (the weighted popularity
of the same release), EASE on the vocabulary's block (:func:`common.ease.ease_weights`),
the rest ranked by noisy popularity, and a blend of EASE scores with noisy popularity.

Choices are picked on the VALIDATION split of a tuning release (a noise draw and device
subsample of its own); the reported figures come from a fresh release per seed, evaluated
with the protocol of ``fedrec baseline`` (sampled HR/NDCG@10 against 99 negatives, full-ranking HR@10).
The study's noise comes from numpy's seeded generator, for reproducibility; a deployment
draws it from :class:`common.privacy.SecureGaussian`.

    python -m simulations.private_ease_study --data-path ../shared/datasets/ml-100k --epsilons 1 3 8
"""

from __future__ import annotations

import argparse
import itertools
import math
import sys
import time
from dataclasses import dataclass

import numpy as np
from scipy import sparse

from common.config import ConfigError, fused_run_config, parse_run_config
from common.errors import DataError
from common.evaluation import evaluate_ranking
from common.federation import PreparedData, prepare
from common.metrics import summarize
from common.privacy import UserLevelDP, calibrate_noise
from common.threads import use_threads
from common import ease
from simulations.baselines import _evaluate_scorers, training_matrix

WEIGHTINGS = ("bound", "inv-k")
TUNING_DRAW, REPORT_DRAW = 0, 1
POPULARITY_OFFSET = 1e6  # items outside the vocabulary rank below every vocabulary item


@dataclass(frozen=True)
class Contribution:
    """How a device bounds its upload: at most ``k_max`` items, weight ``w_u`` for a norm <= ``clip``.

    The uploaded triangle carries the diagonal (the user's items) times ``diagonal`` (a),
    so popularity can get more of the norm than its ``k`` of ``k (k + 1) / 2`` coordinates;
    the server divides the diagonal by a again. ``bound``: ``w_u = min(1, C / |t(k)|)``,
    ``|t(k)| = sqrt(a^2 k + k (k - 1) / 2)`` the exact norm of the uploaded triangle
    (``clip_items`` c sets ``C = |t(c)|``: c = 1 gives every user norm C, c = k_max every
    user weight 1). ``inv-k``: ``w_u = C / k`` with a = 1 (norm ``C sqrt((k + 1) / 2k) <= C``), C = 1.
    """

    k_max: int
    weighting: str = "bound"
    clip_items: int = 1
    diagonal: float = 1.0

    def __post_init__(self) -> None:
        if self.weighting == "inv-k" and self.diagonal != 1.0:
            raise ValueError("the inv-k weighting bounds the norm for diagonal 1 only")

    @property
    def clip(self) -> float:
        return triangle_norm(self.clip_items, self.diagonal) if self.weighting == "bound" else 1.0

    def weight(self, k: int) -> float:
        if k == 0:
            return 0.0
        if self.weighting == "bound":
            return min(1.0, self.clip / triangle_norm(k, self.diagonal))
        return self.clip / k

    def label(self) -> str:
        bound = f" c {self.clip_items} diag {self.diagonal:g}" if self.weighting == "bound" else ""
        return f"k_max {self.k_max} {self.weighting}{bound}"


@dataclass(frozen=True)
class PostProcessing:
    """What the server (or device) does with the noisy Gram; free in privacy."""

    lam_factor: float  # lambda = lam_factor * z C * sqrt(M): the noise's spectral scale (absolute lambda without noise)
    vocabulary: int  # M: top-M items by the noisy diagonal get EASE; 0 = noisy popularity only
    spectral: float = -1.0  # < 0: none; t >= 0: eigenvalues below t z C sqrt(M) set to 0 (0: PSD projection)
    shrink: bool = False  # eigenvalues above the noise's edge replaced by the spike they estimate (spiked Wigner)
    blend: float = 0.0  # weight of standardized noisy popularity beside per-user standardized EASE scores

    def label(self) -> str:
        return f"lam {self.lam_factor:g} M {self.vocabulary} spectral {self.spectral:g}{' shrink' if self.shrink else ''} blend {self.blend:g}"


def triangle_norm(k: int, diagonal: float = 1.0) -> float:
    """L2 norm of the upper triangle of ``x x^T`` for ``k`` binary items, its diagonal times ``diagonal``."""
    return math.sqrt(diagonal**2 * k + k * (k - 1) / 2)


def kept_items(items: np.ndarray, k_max: int, rng: np.random.Generator) -> np.ndarray:
    """At most ``k_max`` of a device's distinct items, drawn uniformly without replacement on the device."""
    items = np.unique(items)
    if len(items) <= k_max:
        return items
    return np.sort(rng.choice(items, size=k_max, replace=False))


def user_vector(items: np.ndarray, num_items: int, weight: float, diagonal: float = 1.0) -> np.ndarray:
    """What one device uploads: ``weight`` times the upper triangle (row-major) of ``x x^T``, diagonal times ``diagonal``."""
    upper = ease.device_gram([items], num_items)  # the triangle a device of the product uploads
    rows, cols = np.triu_indices(num_items)
    upper[rows == cols] *= diagonal
    return weight * upper


def gram_from_triangle(vector: np.ndarray, num_items: int, diagonal: float = 1.0) -> np.ndarray:
    """The symmetric matrix whose upper triangle is ``vector``, its diagonal divided by ``diagonal`` (the server's decoding)."""
    gram = ease.symmetric_gram(vector, num_items)
    gram[np.diag_indices(num_items)] /= diagonal
    return gram


def weighted_gram(kept: list[np.ndarray], weights: np.ndarray, num_items: int) -> np.ndarray:
    """``sum_u w_u x_u x_u^T`` (dense): the sum of every device's :func:`user_vector`, as a matrix."""
    rows = np.repeat(np.arange(len(kept)), [len(k) for k in kept])
    cols = np.concatenate(kept) if kept else np.empty(0, np.int64)
    x = sparse.csr_matrix((np.ones(len(cols)), (rows, cols)), shape=(len(kept), num_items))
    return (x.T @ sparse.diags(weights) @ x).toarray()


def noisy_release(gram: np.ndarray, noise_std: float, rng: np.random.Generator, diagonal: float = 1.0) -> np.ndarray:
    """The decoded release: ``gram`` plus Gaussian noise of std ``noise_std`` on each uploaded coordinate.

    The noise is added to the uploaded triangle (whose diagonal is ``diagonal`` x the Gram's), so
    after decoding it is mirrored off the diagonal and ``noise_std / diagonal`` on it.
    """
    n = gram.shape[0]
    noise = gram_from_triangle(rng.normal(0.0, noise_std, ease.gram_size(n)), n, diagonal)
    return gram + noise


def noise_multiplier(epsilon: float, num_users: int, delta: float, accountant: str) -> tuple[float, float]:
    """``z`` for one release at sampling rate 1, and the epsilon the accountant computes for it."""
    mechanism = dict(clipping_norm=1.0, num_clients=num_users, sampling="poisson", sampling_rate=1.0, delta=delta)
    z = calibrate_noise(epsilon, 1, accountant, **mechanism)
    return z, UserLevelDP(noise_multiplier=z, **mechanism).epsilon(1, accountant)


def user_items(prepared: PreparedData) -> list[np.ndarray]:
    """Each user's distinct training items."""
    matrix = training_matrix(prepared)
    return [matrix.indices[matrix.indptr[u] : matrix.indptr[u + 1]] for u in range(matrix.shape[0])]


def release(items_of: list[np.ndarray], num_items: int, contribution: Contribution, z: float,
            rng: np.random.Generator) -> np.ndarray:
    """One private release of the weighted Gram (no noise when ``z`` is 0)."""
    kept = [kept_items(items, contribution.k_max, rng) for items in items_of]
    weights = np.array([contribution.weight(len(k)) for k in kept])
    gram = weighted_gram(kept, weights, num_items)
    return noisy_release(gram, z * contribution.clip, rng, contribution.diagonal) if z > 0 else gram


def spectral_cut(gram: np.ndarray, threshold: float) -> np.ndarray:
    """``gram`` with every eigenvalue below ``threshold`` set to 0.

    Threshold 0 is the nearest positive semidefinite matrix in Frobenius norm; a threshold at
    the noise's spectral edge (about ``2 z C sqrt(M)`` for M items) keeps only directions the
    noise alone would not produce.
    """
    values, vectors = np.linalg.eigh(gram)
    return (vectors * np.where(values >= threshold, values, 0.0)) @ vectors.T


def spike_shrinkage(gram: np.ndarray, noise_std: float) -> np.ndarray:
    """Eigenvalues beyond the noise's edge ``2 s sqrt(n)`` shrunk to the Frobenius-optimal estimate; the rest 0.

    For symmetric Gaussian noise of std s, a spike theta > s sqrt(n) appears as the eigenvalue
    ``l = theta + s^2 n / theta`` with squared overlap ``1 - s^2 n / theta^2`` with its true
    direction; the best rank-one estimate keeps ``theta (1 - s^2 n / theta^2)``.
    """
    values, vectors = np.linalg.eigh(gram)
    scale = noise_std**2 * gram.shape[0]
    edge = 2.0 * math.sqrt(scale)
    theta = (values + np.sqrt(np.clip(values**2 - 4.0 * scale, 0.0, None))) / 2.0
    spike = values > edge
    safe = np.where(spike, theta, 1.0)
    shrunk = np.where(spike, safe * (1.0 - scale / safe**2), 0.0)
    return (vectors * shrunk) @ vectors.T


def standardized(scores: np.ndarray, axis: int) -> np.ndarray:
    """Zero mean, unit std along ``axis`` (rank-preserving per row when axis = 1)."""
    std = scores.std(axis=axis, keepdims=True)
    return (scores - scores.mean(axis=axis, keepdims=True)) / np.where(std > 0, std, 1.0)


def vocabulary_block(noisy: np.ndarray, m: int, spectral: float, noise_std: float,
                     shrink: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """The top-``m`` items by the noisy diagonal and their block of the noisy Gram (spectrally cut or shrunk if asked)."""
    vocab = np.argsort(-np.diag(noisy), kind="stable")[:m]
    block = noisy[np.ix_(vocab, vocab)]
    if shrink and noise_std > 0:
        return vocab, spike_shrinkage(block, noise_std)
    return vocab, spectral_cut(block, spectral * noise_std * math.sqrt(m)) if spectral >= 0 else block


def ease_scores(matrix: sparse.csr_matrix, block: np.ndarray, vocab: np.ndarray, lam_factor: float,
                noise_std: float) -> np.ndarray:
    """Per-user standardized EASE scores of the vocabulary; lambda in units of the noise's spectral scale."""
    lam = lam_factor * noise_std * math.sqrt(len(vocab)) if noise_std > 0 else lam_factor
    weights = ease.ease_weights(block, lam).astype(np.float32)
    return standardized(np.asarray(matrix[:, vocab] @ weights, np.float64), axis=1)


def combined_scores(noisy: np.ndarray, num_users: int, vocab: np.ndarray, ease: np.ndarray | None,
                    blend: float) -> np.ndarray:
    """EASE (plus ``blend`` x noisy popularity) on the vocabulary; below it, the rest by noisy popularity."""
    popularity = standardized(np.diag(noisy), axis=0)
    scores = popularity[None, :].repeat(num_users, axis=0) - POPULARITY_OFFSET
    if ease is not None:
        scores[:, vocab] = ease + blend * popularity[vocab][None, :]
    return scores


def score_matrix(matrix: sparse.csr_matrix, noisy: np.ndarray, post: PostProcessing, noise_std: float) -> np.ndarray:
    """Every user's score for every item under ``post``."""
    m = min(post.vocabulary, noisy.shape[0])
    if m == 0:
        return combined_scores(noisy, matrix.shape[0], np.empty(0, np.int64), None, 0.0)
    vocab, block = vocabulary_block(noisy, m, post.spectral, noise_std, post.shrink)
    ease = ease_scores(matrix, block, vocab, post.lam_factor, noise_std)
    return combined_scores(noisy, matrix.shape[0], vocab, ease, post.blend)


def tuning_scores(matrix: sparse.csr_matrix, noisy: np.ndarray, posts: list[PostProcessing], noise_std: float):
    """(post, scores) for every post-processing, sharing blocks and EASE solutions between them."""
    blocks: dict[tuple[int, float, bool], tuple[np.ndarray, np.ndarray]] = {}
    eases: dict[tuple[int, float, bool, float], np.ndarray] = {}
    for post in posts:
        m = min(post.vocabulary, noisy.shape[0])
        if m == 0:
            yield post, combined_scores(noisy, matrix.shape[0], np.empty(0, np.int64), None, 0.0)
            continue
        if (m, post.spectral, post.shrink) not in blocks:
            blocks[(m, post.spectral, post.shrink)] = vocabulary_block(noisy, m, post.spectral, noise_std, post.shrink)
        vocab, block = blocks[(m, post.spectral, post.shrink)]
        key = (m, post.spectral, post.shrink, post.lam_factor)
        if key not in eases:
            eases.clear()  # the grid varies the blend innermost: only the latest solution is reused
            eases[key] = ease_scores(matrix, block, vocab, post.lam_factor, noise_std)
        yield post, combined_scores(noisy, matrix.shape[0], vocab, eases[key], post.blend)


def sampled_validation_hr(prepared: PreparedData, scores: np.ndarray) -> float:
    """Sampled HR@10 on the validation split (the only split choices are made on)."""
    v = prepared.validation
    per_user = evaluate_ranking(lambda u, i: scores[u, i], None, v.users, v.items, v.negatives, None, k=10, full=False)
    return summarize(per_user)["sampled_hr@10"]


def final_metrics(prepared: PreparedData, scores: np.ndarray) -> dict[str, float]:
    """Test and validation metrics with ``fedrec baseline``'s own evaluation (sampled and full ranking)."""
    test, val = _evaluate_scorers(prepared, lambda u, i: scores[u, i], lambda u: scores[u], 10)
    return {"hr": test["sampled_hr@10"], "ndcg": test["sampled_ndcg@10"], "full_hr": test["full_hr@10"],
            "val_hr": val["sampled_hr@10"]}


def load(data_path: str, dataset: str, seed: int) -> PreparedData:
    return prepare(parse_run_config(fused_run_config({"dataset": dataset, "data-path": data_path, "seed": seed})))


def draw_rng(seed: int, epsilon: float, draw: int) -> np.random.Generator:
    """Device subsampling and noise of one release: distinct for every seed, epsilon and draw."""
    return np.random.default_rng([seed, int(round(epsilon * 1000)), draw])


def grid(args: argparse.Namespace) -> tuple[list[Contribution], list[PostProcessing]]:
    contributions = [Contribution(k, w, c, a) for k, w, c, a in
                     itertools.product(args.k_max, args.weightings, args.clip_items, args.diagonal)
                     if not (w == "inv-k" and (c, a) != (args.clip_items[0], 1.0))]
    spectra = [(cut, False) for cut in args.spectral] + ([(-1.0, True)] if args.shrink else [])
    posts = [PostProcessing(lam, m, spectral=cut, shrink=shrink, blend=b) for lam, m, (cut, shrink), b in
             itertools.product(args.lambdas, args.vocabulary, spectra, args.blend)
             if not (m == 0 and (lam, cut, shrink, b) != (args.lambdas[0], *spectra[0], args.blend[0]))]
    return contributions, posts


def tune(prepared_of: dict[int, PreparedData], items_of: dict[int, list[np.ndarray]], epsilon: float, z: float,
         args: argparse.Namespace) -> dict[tuple[Contribution, PostProcessing], list[float]]:
    """Validation HR@10 of every grid point on each seed's tuning release."""
    contributions, posts = grid(args)
    out: dict[tuple[Contribution, PostProcessing], list[float]] = {}
    for contribution in contributions:
        for seed, prepared in prepared_of.items():
            noisy = release(items_of[seed], prepared.num_items, contribution, z, draw_rng(seed, epsilon, TUNING_DRAW))
            matrix = training_matrix(prepared)
            for post, scores in tuning_scores(matrix, noisy, posts, z * contribution.clip):
                out.setdefault((contribution, post), []).append(sampled_validation_hr(prepared, scores))
    return out


def report(prepared_of, items_of, epsilon: float, z: float, chosen: tuple[Contribution, PostProcessing]
           ) -> dict[int, dict[str, float]]:
    """The chosen setting on a fresh release per seed: test and validation metrics."""
    contribution, post = chosen
    rows = {}
    for seed, prepared in prepared_of.items():
        noisy = release(items_of[seed], prepared.num_items, contribution, z, draw_rng(seed, epsilon, REPORT_DRAW))
        rows[seed] = final_metrics(prepared, score_matrix(training_matrix(prepared), noisy, post, z * contribution.clip))
    return rows


def print_tuning(results: dict, epsilon: float, top: int) -> tuple[Contribution, PostProcessing]:
    ranked = sorted(results.items(), key=lambda kv: -float(np.mean(kv[1])))
    print(f"\n## epsilon {epsilon:g}: validation HR@10 of the tuning release (mean of seeds; best {top} of {len(ranked)})")
    for (contribution, post), hrs in ranked[:top]:
        print(f"{float(np.mean(hrs)):.4f}  [{' '.join(f'{h:.4f}' for h in hrs)}]  {contribution.label()} | {post.label()}")
    return ranked[0][0]


def run(args: argparse.Namespace) -> None:
    prepared_of = {seed: load(args.data_path, args.dataset, seed) for seed in args.seeds}
    items_of = {seed: user_items(p) for seed, p in prepared_of.items()}
    num_users = next(iter(prepared_of.values())).num_users
    table = []
    for epsilon in args.epsilons:
        started = time.perf_counter()
        z, spent = noise_multiplier(epsilon, num_users, args.delta, args.accountant) if epsilon > 0 else (0.0, math.inf)
        chosen = print_tuning(tune(prepared_of, items_of, epsilon, z, args), epsilon, args.top)
        rows = report(prepared_of, items_of, epsilon, z, chosen)
        table.append((epsilon, z, spent, chosen, rows, time.perf_counter() - started))
        print(f"(epsilon {epsilon:g}: {time.perf_counter() - started:.0f} s)", flush=True)
    print_table(table, args)


def print_table(table: list, args: argparse.Namespace) -> None:
    print(f"\n## Reported: fresh release per seed, setting chosen on validation; delta {args.delta:g}, "
          f"accountant {args.accountant}, one release at sampling rate 1")
    print("| target epsilon | accountant's epsilon (delta) | z | chosen | seed | HR@10 | NDCG@10 | full HR@10 | val HR@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for epsilon, z, spent, (contribution, post), rows, _ in table:
        label = f"{contribution.label()}; {post.label()}"
        eps = f"{spent:.3f} ({args.delta:g})" if math.isfinite(spent) else "none"
        for seed, m in rows.items():
            print(f"| {epsilon:g} | {eps} | {z:.3f} | {label} | {seed} | {m['hr']:.4f} | {m['ndcg']:.4f} | "
                  f"{m['full_hr']:.4f} | {m['val_hr']:.4f} |")
        mean = {k: float(np.mean([m[k] for m in rows.values()])) for k in ("hr", "ndcg", "full_hr", "val_hr")}
        print(f"| {epsilon:g} | {eps} | {z:.3f} | {label} | **mean** | **{mean['hr']:.4f}** | {mean['ndcg']:.4f} | "
              f"{mean['full_hr']:.4f} | {mean['val_hr']:.4f} |")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", default="movielens-100k")
    p.add_argument("--data-path", default="")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 7, 1])
    p.add_argument("--epsilons", type=float, nargs="+", default=[1.0, 3.0, 8.0], help="0: no noise")
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--accountant", choices=("rdp", "pld"), default="rdp")
    p.add_argument("--k-max", type=int, nargs="+", default=[100], help="items a device keeps (grid)")
    p.add_argument("--weightings", nargs="+", choices=WEIGHTINGS, default=["bound"])
    p.add_argument("--clip-items", type=int, nargs="+", default=[1],
                   help="bound weighting: C = sqrt(c (c + 1) / 2), users with <= c items keep weight 1 (grid)")
    p.add_argument("--diagonal", type=float, nargs="+", default=[1.0],
                   help="bound weighting: the diagonal's factor a in the uploaded triangle (grid)")
    p.add_argument("--lambdas", type=float, nargs="+", default=[1.0],
                   help="lambda in units of z C sqrt(M) (absolute lambda when epsilon is 0) (grid)")
    p.add_argument("--vocabulary", type=int, nargs="+", default=[100_000], help="M, top items by noisy diagonal (grid)")
    p.add_argument("--spectral", type=float, nargs="+", default=[-1.0],
                   help="< 0: no projection; t >= 0: eigenvalues below t z C sqrt(M) set to 0, 0 = PSD (grid)")
    p.add_argument("--shrink", action="store_true", help="also try spiked-Wigner eigenvalue shrinkage (grid)")
    p.add_argument("--blend", type=float, nargs="+", default=[0.0], help="weight of noisy popularity (grid)")
    p.add_argument("--top", type=int, default=15, help="tuning rows printed per epsilon")
    return p


def main() -> None:
    try:
        use_threads()
    except ValueError as err:
        print(f"private_ease_study: {err}", file=sys.stderr)
        sys.exit(2)
    args = parser().parse_args()
    try:
        run(args)
    except (ConfigError, DataError) as err:  # a bad path or run-config value: one line, exit 2
        print(f"private_ease_study: {err}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
