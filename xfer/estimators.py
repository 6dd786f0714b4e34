"""Transferability estimates: rank pretrained models for a target task from one forward pass, without fine-tuning.

Four standard estimators, each a pure numpy (float64) function of what a pretrained model computes on the
target's training images:

- `leep` (Nguyen et al. 2020) and `nce` (Tran et al. 2019) read the SOURCE head's softmax over the source's own
  classes, and ask how well the source's classes predict the target's labels;
- `h_score` (Bao et al. 2019) and `logme` (You et al. 2021) read the body's penultimate features
  (`XferModel.body`), and ask how well a linear model on them separates or fits the target's labels.

Higher is better for all four: LEEP and NCE are average log-likelihoods (≤ 0, 0 = the source's classes
determine the target's labels), the H-score is a discriminability ratio (≥ 0, at most the number of target
classes − 1), LogME a log evidence per example. Values compare models on one target; they are not
comparable across targets. `features_and_probs` runs an `XferModel` once to get both inputs, and `scores`
returns the four estimates under the names in `ESTIMATORS`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from xfer.errors import XferError

if TYPE_CHECKING:
    import torch

    from xfer.models import XferModel

ESTIMATORS = ("leep", "nce", "h_score", "logme")

PROB_SUM_TOLERANCE = 1e-3      # a softmax row may miss 1 by this much (bf16/float32 rounding) before it is refused
H_SCORE_RTOL = 1e-10           # feature-covariance eigenvalues below this × the largest count as zero (see h_score)
CENTRING_RTOL = 1e-20          # ... and below this × the features' mean square: the centring's own rounding
LOGME_TOL = 1e-5               # the fixed point stops when α and β both change by less than this, relatively
LOGME_MAX_ITER = 100           # ... or after this many (typically a handful; a slow, flat approach ends ~1e-6 short)
LOGME_RATIO_RANGE = (1e-12, 1e12)  # α/β is kept within this × the largest σ² (see logme: a supremum at infinity)


# ---- the estimators -----------------------------------------------------------------------------------

def leep(source_probs: npt.ArrayLike, target_labels: npt.ArrayLike, n_target_classes: int) -> float:
    """Log Expected Empirical Prediction (Nguyen, Hassner, Seeger & Archambeau, "LEEP: A New Measure to Evaluate
    Transferability of Learned Representations", ICML 2020).

    With θ(x_i) = `source_probs[i]` the source head's softmax over its Z classes on target example i, and y_i its
    target label, n examples:

        P(y, z) = (1/n) Σ_i θ(x_i)_z [y_i = y]           the empirical joint of target label and source class
        P(y | z) = P(y, z) / P(z),   P(z) = Σ_y P(y, z)
        LEEP = (1/n) Σ_i log Σ_z P(y_i | z) θ(x_i)_z

    the average log-likelihood of the target labels under the "expected empirical predictor" that maps the
    source's class distribution to the target's. LEEP ≤ 0; 0 when every source class determines a target label.
    A source class no target example puts mass on (P(z) = 0) has θ(x_i)_z = 0 for every i and adds nothing.
    """
    probs = _probabilities(source_probs)
    labels = _labels(target_labels, len(probs), n_target_classes)
    joint = np.zeros((n_target_classes, probs.shape[1]))
    np.add.at(joint, labels, probs)
    joint /= len(probs)
    marginal = joint.sum(0)
    conditional = np.divide(joint, marginal, out=np.zeros_like(joint), where=marginal > 0)
    return float(np.mean(np.log(np.sum(conditional[labels] * probs, axis=1))))


def nce(source_probs: npt.ArrayLike, target_labels: npt.ArrayLike, n_target_classes: int) -> float:
    """Negative Conditional Entropy (Tran, Nguyen & Hassner, "Transferability and Hardness of Supervised
    Classification Tasks", ICCV 2019), from the source head's hard pseudo-labels.

    NCE is defined between two labelings of the same examples. Here the source labeling is the source head's
    prediction z_i = argmax_z θ(x_i)_z (`source_probs[i]`), as in LEEP's paper (Nguyen et al. 2020, §4) where NCE
    is compared on the same inputs as LEEP. With the empirical joint of (y_i, z_i) over n examples,

        P(y, z) = (1/n) #{i : y_i = y, z_i = z},   P(y | z) = P(y, z) / P(z)
        NCE = −H(Y | Z) = Σ_{y,z : P(y,z) > 0} P(y, z) log P(y | z)

    NCE ≤ 0; 0 when the source prediction determines the target label, −H(Y) when the two are independent.
    """
    probs = _probabilities(source_probs)
    labels = _labels(target_labels, len(probs), n_target_classes)
    joint = np.zeros((n_target_classes, probs.shape[1]))
    np.add.at(joint, (labels, probs.argmax(1)), 1.0)
    joint /= len(probs)
    marginal = np.broadcast_to(joint.sum(0), joint.shape)
    seen = joint > 0
    return float(np.sum(joint[seen] * np.log(joint[seen] / marginal[seen])))


def h_score(features: npt.ArrayLike, target_labels: npt.ArrayLike) -> float:
    """H-score (Bao, Li, Huang, Tong, Xu & Zhang, "An Information-Theoretic Approach to Transferability in Task
    Transfer Learning", ICIP 2019).

    With f the n×D features and y the target labels,

        H = tr( cov(f)⁺ · cov(E[f | y]) )

    where cov(E[f | y]) is the covariance of the class-conditional means replicated per example, i.e. the
    between-class covariance Σ_y (n_y/n) (μ_y − μ)(μ_y − μ)ᵀ, and cov(f) the total covariance (both with 1/n;
    the normalisation cancels). The inverse is a pseudo-inverse, not a ridge: penultimate features are often
    rank-deficient (dead ReLUs, more dimensions than examples), and the class means' deviations always lie in
    the span of the centred features, so dropping the zero-variance directions loses nothing and, unlike a ridge,
    adds no scale-dependent bias. Directions whose variance is below `H_SCORE_RTOL` × the largest (or
    `CENTRING_RTOL` × the features' mean square) count as zero: float32 features carry rounding variance near 1e-14
    of their scale, which a literal inverse would amplify.
    0 ≤ H ≤ (number of classes − 1); invariant to shifting the features and to invertible linear maps of them.
    """
    feats = _features(features)
    labels = _labels(target_labels, len(feats), None)
    centred = feats - feats.mean(0)
    classes, per_example = np.unique(labels, return_inverse=True)
    means = np.zeros((len(classes), feats.shape[1]))
    np.add.at(means, per_example, centred)
    means /= np.bincount(per_example)[:, None]
    between = means[per_example]
    eigenvalues, eigenvectors = np.linalg.eigh(centred.T @ centred / len(feats))
    # constant features centre to ~1e-16 of their size, not 0: the second floor makes them score 0, not noise
    floor = max(H_SCORE_RTOL * eigenvalues.max(), CENTRING_RTOL * float(np.mean(feats**2)))
    kept = eigenvalues > floor
    projected = between @ eigenvectors[:, kept]
    return float(np.sum(np.mean(projected**2, axis=0) / eigenvalues[kept]))


def logme(features: npt.ArrayLike, target_labels: npt.ArrayLike) -> float:
    """LogME, the logarithm of maximum evidence (You, Liu, Wang & Long, "LogME: Practical Assessment of
    Pre-trained Models for Transfer Learning", ICML 2021), Algorithm 1.

    For each target class k present, t = the one-hot column [y_i = k] is regressed on the n×D features F with a
    Bayesian linear model t = F w + ε, w ~ N(0, α⁻¹ I), ε ~ N(0, β⁻¹ I). With A = α I + β FᵀF and m = β A⁻¹ Fᵀ t
    the posterior mean, the log evidence is

        L(α, β) = n/2 log β + D/2 log α − n/2 log 2π − β/2 ‖F m − t‖² − α/2 mᵀm − 1/2 log |A|

    and (α, β) are set by the paper's fixed-point iteration from α = β = 1, using the thin SVD F = U diag(σ) Vᵀ:

        γ = Σ_i β σ_i² / (α + β σ_i²),   α ← γ / mᵀm,   β ← (n − γ) / ‖F m − t‖²

    until both change by less than `LOGME_TOL` relatively (at most `LOGME_MAX_ITER` updates). LogME is the mean
    over classes of L/n at the final (α, β). When n < D the thin SVD has n singular values and the other D − n
    eigenvalues of FᵀF are zero, so log |A| = Σ_i log(α + β σ_i²) + (D − n) log α with the padded zeros; it is
    evaluated in the equal, cancellation-free form D/2 log α − 1/2 log |A| = −1/2 Σ_i log(1 + β σ_i² / α).

    The evidence's supremum can lie at α/β → ∞ (a class no feature responds to: t ⊥ columns of F) or α/β → 0
    (n ≤ D and t fitted exactly); there the iteration would run to an infinite α or β. α/β is therefore kept
    within `LOGME_RATIO_RANGE` × σ²_max, and the evidence at that bound, where it has flattened out, stands for
    its limit. No bias is added to F, as in the paper.
    """
    feats = _features(features)
    labels = _labels(target_labels, len(feats), None)
    n = len(feats)
    left, singular, _ = np.linalg.svd(feats, full_matrices=False)
    sigma2 = singular**2
    evidences = []
    for k in np.unique(labels):
        target = (labels == k).astype(np.float64)
        evidences.append(_evidence_per_example(sigma2, left.T @ target, float(target @ target), n))
    return float(np.mean(evidences))


def scores(features: npt.ArrayLike, source_probs: npt.ArrayLike, target_labels: npt.ArrayLike,
           n_target_classes: int, seconds: dict[str, float] | None = None) -> dict[str, float]:
    """All four estimates for one (pretrained model, target task) pair, named and ordered as `ESTIMATORS`.

    In xfer the inputs come from one forward pass of the pretrained `XferModel` over the target's training
    images (`features_and_probs`): `features` = the body's penultimate output (n × feature_dim), `source_probs` =
    the softmax of the SOURCE head over the source's own classes (n × source classes; the head is not replaced
    by a target head), `target_labels` = the target's labels of those images, in 0..n_target_classes − 1.
    Higher is better for every estimate; rank candidate models for a target by each one separately. `seconds`,
    when given, receives each estimator's wall time under its name.
    """
    import time

    calls = {
        "leep": lambda: leep(source_probs, target_labels, n_target_classes),
        "nce": lambda: nce(source_probs, target_labels, n_target_classes),
        "h_score": lambda: h_score(features, target_labels),
        "logme": lambda: logme(features, target_labels),
    }
    out = {}
    for name in ESTIMATORS:
        began = time.perf_counter()
        out[name] = calls[name]()
        if seconds is not None:
            seconds[name] = time.perf_counter() - began
    return out


def features_and_probs(model: XferModel, images: torch.Tensor, batch_size: int = 512) -> tuple[np.ndarray, np.ndarray]:
    """The penultimate features and source softmax of `model` on `images`: the inputs of `scores`.

    `images` are N×C×H×W, uint8 or float in [0, 1] (converted by `xfer.attack.as_unit`, as attacks and scoring
    do); the model normalises inside. It runs on the model's device, in eval mode (BatchNorm's running statistics,
    no dropout), without gradients, `batch_size` images per pass and in float32 (no autocast: the estimators
    divide by small covariances). Returns (features, probs) as float64 numpy arrays of shapes (N, feature_dim)
    and (N, model.num_classes); each module's training flag is restored afterwards.
    """
    import torch  # here only: the estimators themselves are numpy and import without torch

    from xfer.attack import as_unit

    if batch_size < 1:
        raise XferError(f"features_and_probs needs a batch size of at least 1 image, not {batch_size}.")
    if images.ndim != 4 or tuple(images.shape[1:]) != tuple(model.in_shape):
        raise XferError(f"{model.arch} takes N×{'×'.join(map(str, model.in_shape))} images but these are "
                        f"{'×'.join(map(str, images.shape))}; pass the target's images in the model's input shape.")
    device = next(model.parameters()).device
    modes = {m: m.training for m in model.modules()}
    model.eval()
    feature_batches, prob_batches = [], []
    try:
        with torch.no_grad():
            for begin in range(0, len(images), batch_size):
                x = as_unit(images[begin:begin + batch_size]).to(device)
                feats = model.body((x - model.mean) / model.std).flatten(1)
                # softmax in float64, so each row sums to 1 to ~1e-16 whatever the logits' precision
                prob_batches.append(torch.softmax(model.head(feats).double(), dim=1).cpu())
                feature_batches.append(feats.double().cpu())
    finally:
        for module, training in modes.items():
            module.training = training
    if not feature_batches:
        return np.zeros((0, model.head.in_features)), np.zeros((0, model.num_classes))
    return torch.cat(feature_batches).numpy(), torch.cat(prob_batches).numpy()


# ---- LogME's fixed point --------------------------------------------------------------------------------

def _evidence_per_example(sigma2: np.ndarray, projected: np.ndarray, target_sq: float, n: int) -> float:
    """L/n of one target column t at LogME's fixed point, from σ² (descending), Uᵀt and ‖t‖² (see `logme`)."""
    scale = sigma2[0] if len(sigma2) and sigma2[0] > 0 else 1.0   # all-zero features: α/β does not matter
    ratio_low, ratio_high = LOGME_RATIO_RANGE[0] * scale, LOGME_RATIO_RANGE[1] * scale
    alpha, beta = 1.0, 1.0
    for _ in range(LOGME_MAX_ITER):
        gamma, m_sq, residual_sq = _posterior(alpha, beta, sigma2, projected, target_sq)
        new_beta = (n - gamma) / residual_sq
        new_alpha = gamma / m_sq if m_sq > 0 else math.inf
        if new_alpha > ratio_high * new_beta:
            new_alpha = ratio_high * new_beta
        elif new_alpha < ratio_low * new_beta:
            new_beta = new_alpha / ratio_low
        done = abs(new_alpha - alpha) <= LOGME_TOL * alpha and abs(new_beta - beta) <= LOGME_TOL * beta
        alpha, beta = new_alpha, new_beta
        if done:
            break
    _, m_sq, residual_sq = _posterior(alpha, beta, sigma2, projected, target_sq)
    evidence = (n / 2 * math.log(beta) - n / 2 * math.log(2 * math.pi) - beta / 2 * residual_sq - alpha / 2 * m_sq
                - 0.5 * float(np.sum(np.log1p(beta * sigma2 / alpha))))
    return evidence / n


def _posterior(alpha: float, beta: float, sigma2: np.ndarray, projected: np.ndarray,
               target_sq: float) -> tuple[float, float, float]:
    """γ, mᵀm and ‖F m − t‖² at (α, β), in the SVD basis: m's coordinates are β σ_i (Uᵀt)_i / (α + β σ_i²)."""
    shrink = alpha + beta * sigma2
    gamma = float(np.sum(beta * sigma2 / shrink))
    m_sq = float(np.sum((beta * np.sqrt(sigma2) * projected / shrink) ** 2))
    # the residual within U's span, plus the part of t outside it (zero when n ≤ D and F has full row rank)
    outside = max(target_sq - float(projected @ projected), 0.0)
    residual_sq = float(np.sum((alpha * projected / shrink) ** 2)) + outside
    return gamma, m_sq, residual_sq


# ---- input checks -------------------------------------------------------------------------------------

def _features(features: npt.ArrayLike) -> np.ndarray:
    feats = np.asarray(features, dtype=np.float64)
    if feats.ndim != 2 or feats.shape[1] < 1:
        raise XferError(f"features must be an n×D matrix, one row per target example, not an array of shape "
                        f"{feats.shape}; flatten the body's output per example (features_and_probs does).")
    _finite(feats, "features")
    return feats


def _probabilities(source_probs: npt.ArrayLike) -> np.ndarray:
    probs = np.asarray(source_probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 1:
        raise XferError(f"source_probs must be an n×Z matrix, one softmax row over the source's classes per target "
                        f"example, not an array of shape {probs.shape}.")
    _finite(probs, "source_probs")
    sums = probs.sum(1)
    if len(probs) and (probs.min() < 0 or np.abs(sums - 1).max() > PROB_SUM_TOLERANCE):
        raise XferError(f"source_probs rows must be probability vectors, but their entries range over "
                        f"[{probs.min():.3g}, {probs.max():.3g}] and their sums over "
                        f"[{sums.min():.6g}, {sums.max():.6g}]; pass the softmax of the source head's logits, "
                        "not the logits (features_and_probs does).")
    return probs / sums[:, None]   # rounding only: exact sums make LEEP ≤ 0 hold exactly


def _labels(target_labels: npt.ArrayLike, n: int, n_classes: int | None) -> np.ndarray:
    labels = np.asarray(target_labels)
    if labels.ndim != 1 or not (np.issubdtype(labels.dtype, np.integer) or labels.dtype == bool):
        raise XferError(f"target labels must be a 1-D array of integer class indices, not an array of shape "
                        f"{labels.shape} and dtype {labels.dtype}; pass the target split's labels as they are stored.")
    if len(labels) != n:
        raise XferError(f"{n} examples (rows of features or source_probs) but {len(labels)} target labels; pass the "
                        "model's outputs and the labels of the same target examples, in the same order.")
    labels = labels.astype(np.int64)
    if n_classes is not None and n and (labels.min() < 0 or labels.max() >= n_classes):
        raise XferError(f"target labels range over [{labels.min()}, {labels.max()}], outside 0..{n_classes - 1} for "
                        f"n_target_classes={n_classes}; pass the target task's class count, with labels 0-based.")
    if n_classes is None and n and labels.min() < 0:
        raise XferError(f"target labels must be class indices ≥ 0, but the smallest is {labels.min()}; "
                        "pass 0-based labels, as xfer's datasets store them.")
    present = np.unique(labels)
    if len(present) < 2:
        which = f"only class {present[0]}" if len(present) else "no examples"
        raise XferError(f"the target labels hold {which}; a transferability estimate needs examples of at least two "
                        "target classes to tell apart. Draw the scored examples across the target's classes.")
    return labels


def _finite(values: np.ndarray, name: str) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        rows = int(bad.any(axis=1).sum())
        raise XferError(f"{name} hold NaN or infinite values in {rows} of {len(values)} rows; the model's forward pass "
                        "is not finite on these images (diverged weights, or images not uint8 / floats in [0, 1]).")
