"""The expected-F1 decision: per item, the label set that maximises the item's expected F1 under
its label probabilities, assuming the labels independent given the item.

Sample-averaged F1 is a sum of per-item F1s, so the best decision is made item by item: for the
probabilities p of one item, predict the set S maximising E[F1(S, Y)] with Y_j ~ Bernoulli(p_j).
Under independence the best set is always the k most probable labels for some k (Lewis 1995), so
only n candidates are scored; each score is exact:

    E[F1(top-k, Y)] = Σ_t Σ_r P(TP = t) · P(R = r) · 2t / (k + t + r)

with TP the true labels inside the top k and R those outside, both Poisson-binomial, their
distributions built by one convolution per label (the O(n²) idea of Ye et al., ICML 2012; the
general, dependence-aware form is Waegeman et al., JMLR 2014). k ≥ 1: every item carries a label,
as the threshold rules' top-1 fallback also ensures. No threshold is tuned, so nothing is fitted
to the validation rows; it needs calibrated probabilities (Lipton et al. 2014 show a tuned
threshold is the better bet when they are not), which is why it is measured out of fold.

With thousands of labels (issue 29) scoring every k would cost labels³ per item. Only the K most
probable labels are tried as sets (K = FIRST_SET_SIZES, doubled for the items that need it);
the labels beyond them enter only through the distribution of their count, built once per item
and cut where its tail mass is below 1e-12. An item keeps its top-K answer only when it is
provably the best: any larger set scores at most E[2Y / (K + 1 + Y)] (Y the item's true label
count; F1 = 2·TP / (k + Y) ≤ 2Y / (k + Y)), and the best of the K beats that. So the cost per
item is about labels × (that count's width) + K³, linear in labels, and with at most
FIRST_SET_SIZES labels it is the textbook computation above, to the last bit.
"""
from __future__ import annotations

import logging
from typing import Callable

import numpy as np

log = logging.getLogger(__name__)

FIRST_SET_SIZES = 32  # K: set sizes tried first; more labels than this: the rest as a count
MOST_SET_SIZES = 128  # set sizes tried at most: an item's best of its top 128 (said in the log)
TAIL_MASS = 1e-12  # probability mass of the rest's count allowed to fall beyond the kept width
SMALL_P = 0.2  # the rest's probabilities all below this: its count from power sums (stable)
DENSE_POWERS = 5  # power sums taken over every label of the rest; later ones over the larger
ROW_BLOCK = 1 << 22  # probabilities handled at once (rows × labels): bounds memory


def poisson_binomial(p: np.ndarray, start: np.ndarray | None = None,
                     width: int | None = None) -> np.ndarray:
    """(N, m) success probabilities → (N, m + 1) distribution of the number of successes.

    `start` (N, s): the distribution of a count to add them to (default: 0 for sure), giving
    (N, s + m); `width` keeps only the first `width` values (the mass beyond is dropped)."""
    n, m = p.shape
    s = 1 if start is None else start.shape[1]
    w = s + m if width is None else min(width, s + m)
    dist = np.zeros((n, w))
    if start is None:
        dist[:, 0] = 1.0
    else:
        dist[:, :min(s, w)] = start[:, :w]
    for j in range(m):
        q = p[:, j:j + 1]
        hi = min(w, s + j + 1)  # values reachable after j + 1 labels, within the width
        dist[:, 1:hi] = dist[:, 1:hi] * (1 - q) + dist[:, :hi - 1] * q
        dist[:, 0] *= 1 - q[:, 0]
    return dist


def expected_f1_by_k(probs: np.ndarray) -> np.ndarray:
    """(N, C) probabilities → (N, C) expected F1 of predicting each item's top k labels, k = 1..C
    (every k: labels³ per item; the decision itself tries few, see `best_set_sizes`)."""
    probs = np.clip(np.asarray(probs, dtype=np.float64), 0.0, 1.0)
    ranked = -np.sort(-probs, axis=1)
    return _by_k(ranked, np.ones((len(probs), 1)))


def _by_k(top: np.ndarray, rest: np.ndarray) -> np.ndarray:
    """(n, K) expected F1 of each item's top k labels, k = 1..K, from `top` (n, K), the K most
    probable labels' probabilities in descending order, and `rest` (n, w), the distribution of
    the count of the other labels' true ones."""
    n, k_max = top.shape
    out = np.empty((n, k_max))
    textbook = rest.shape[1] == 1 and k_max <= FIRST_SET_SIZES
    if not textbook:  # the outside counts from the last k down, one label each
        outside_of = [rest]
        for j in range(k_max - 1, 0, -1):
            outside_of.append(poisson_binomial(top[:, j:j + 1], outside_of[-1]))
        outside_of.reverse()  # [k - 1]: the count outside the top k
    inside = np.ones((n, 1))
    for k in range(1, k_max + 1):
        if textbook:  # as written first, to the last bit
            inside = poisson_binomial(top[:, :k])  # (N, k + 1): true labels among the k
            outside = poisson_binomial(top[:, k:], rest)  # true labels missed
        else:
            inside = poisson_binomial(top[:, k - 1:k], inside)
            outside = outside_of[k - 1]
        t = np.arange(k + 1)[:, None]
        r = np.arange(outside.shape[1])[None, :]
        f1 = 2.0 * t / (k + t + r)  # (k + 1, width); k ≥ 1, so never 0 / 0
        out[:, k - 1] = np.einsum("nt,tr,nr->n", inside, f1, outside)
    return out


def _larger_sets_bound(top: np.ndarray, rest: np.ndarray, next_p: np.ndarray) -> np.ndarray:
    """(n,) an upper bound of E[F1] of any top-k set with k > K (`next_p`: the (K+1)-th largest
    probability). Two bounds, the smaller kept: F1 ≤ 2Y / (k + Y) with Y the true label count
    (the top K's count plus the rest's; the rest's cut-off mass added); and, as F1 ≤ 2·TP /
    (k + TP) is concave in TP, E[F1] ≤ 2·S / (k + S) with S = E[TP] ≤ S_K + (k - K)·next_p,
    which falls with k, so k = K + 1 bounds them all."""
    k = top.shape[1]
    inside = poisson_binomial(top)
    a = np.arange(k + 1)[:, None] + np.arange(rest.shape[1])[None, :]  # Y = a + r
    by_count = np.einsum("na,ar,nr->n", inside, 2.0 * a / (k + 1 + a), rest)
    by_count += np.clip(1.0 - rest.sum(axis=1), 0.0, None)
    s = top.sum(axis=1) + next_p
    return np.minimum(by_count, 2.0 * s / (k + 1 + s))


def count_distribution(rest_p: np.ndarray) -> np.ndarray:
    """The distribution of the number of true labels among `rest_p` (n, m), cut to a width
    holding all but TAIL_MASS of it (mean + 7·sd + 15 values, widened where that is not).

    Small probabilities (all below SMALL_P, as the rest of thousands of labels is) go through
    their power sums: Π(1 - p + p·z) = Π(1 - p) · exp(Σ_i (-1)^(i+1) s_i z^i / i) with
    s_i = Σ ρ^i, ρ = p / (1 - p) (Newton's identities), and s_i falls below 1e-18 after a few
    dozen i: a few passes over the labels instead of one per value of the count."""
    n, m = rest_p.shape
    if m == 0:
        return np.ones((n, 1))
    mean = float(rest_p.sum(axis=1).max())
    width = int(min(m + 1, np.ceil(mean + 7 * np.sqrt(mean) + 15)))
    small = float(rest_p.max()) <= SMALL_P
    while True:
        dist = _count_by_power_sums(rest_p, width) if small else poisson_binomial(rest_p, width=width)
        if width == m + 1 or (1.0 - dist.sum(axis=1)).max() <= TAIL_MASS:
            return dist
        width = min(m + 1, 2 * width)


def _count_by_power_sums(p: np.ndarray, width: int) -> np.ndarray:
    """`poisson_binomial(p, width=width)` for probabilities p ≤ SMALL_P (see `count_distribution`).

    A power sum s_i matters while some ρ^i is above 1e-20: a ρ of 1e-4 for 5 powers, of 0.01
    for 10, of 0.25 for about 33. So every ρ enters the first DENSE_POWERS sums, and only the
    few larger ones the later sums."""
    n, m = p.shape
    last = width - 1  # the count's values 0..width-1 need s_1..s_(width-1)
    kept = 1.0 - p
    log_kept = np.log(kept).sum(axis=1)
    rho = np.divide(p, kept, out=kept)
    sums = np.zeros((n, width))
    power = rho.copy()
    for i in range(1, min(DENSE_POWERS, last) + 1):
        if i > 1:
            power *= rho
        sums[:, i] = power.sum(axis=1)
    if last > DENSE_POWERS:
        r, k = np.nonzero(power > 1e-20 ** (DENSE_POWERS / (DENSE_POWERS + 1)))
        big, power = rho[r, k], power[r, k]
        for i in range(DENSE_POWERS + 1, last + 1):
            power *= big
            alive = power > 1e-20
            if not alive.any():
                break
            sums[:, i] = np.bincount(r, power, minlength=n)
            if alive.mean() < 0.5:
                r, big, power = r[alive], big[alive], power[alive]
    e = np.zeros((n, width))  # elementary symmetric sums of ρ: m·e_m = Σ (-1)^(i-1) e_(m-i) s_i
    e[:, 0] = 1.0
    sign = -(-1.0) ** np.arange(width + 1)  # (-1)^(i - 1)
    for v in range(1, width):
        i = np.arange(1, v + 1)
        e[:, v] = (e[:, v - i] * sums[:, i] * sign[i]).sum(axis=1) / v
    return e * np.exp(log_kept)[:, None]


def best_set_sizes(probs: np.ndarray) -> np.ndarray:
    """(N,) each item's expected-F1-maximising set size (ties: the smaller set), for
    probabilities in [0, 1] as float64."""
    n, c = probs.shape
    best = np.zeros(n, dtype=np.int64)
    proven = np.zeros(n, dtype=bool)
    todo = np.arange(n)
    k = min(c, FIRST_SET_SIZES)
    while True:
        # a block holds about ROW_BLOCK probabilities, or as many of the top sets' counts
        for rows in np.array_split(todo, max(1, len(todo) * max(c, 4 * k * k) // ROW_BLOCK)):
            if k >= c:
                top, rest = -np.sort(-probs[rows], axis=1), np.ones((len(rows), 1))
            else:
                part = -np.partition(-probs[rows], k - 1, axis=1)
                top, rest = -np.sort(-part[:, :k], axis=1), count_distribution(part[:, k:])
            scores = _by_k(top, rest)
            best[rows] = scores.argmax(axis=1) + 1
            # proven where no larger set can beat it
            proven[rows] = True if k >= c else \
                scores.max(axis=1) > _larger_sets_bound(top, rest, part[:, k:].max(axis=1))
        todo = np.flatnonzero(~proven)
        if not len(todo):
            return best
        if k >= MOST_SET_SIZES:
            log.info("gfm: %d item(s) may be best served by more than %d labels; they get the "
                     "best set of their top %d", len(todo), k, k)
            return best
        k = min(c, 2 * k)


def expected_f1_work(probs: np.ndarray) -> float:
    """An estimate of `decide_expected_f1`'s work in score-steps (about a nanosecond of one core
    each): per item, about 140 per label beyond the first K (the passes of their count's power
    sums), and 3·K³ for the top sets."""
    n, c = probs.shape
    k = min(c, FIRST_SET_SIZES)
    return float(n) * (140 * max(0, c - k) + 3 * k ** 3)


def decide_expected_f1(probs: np.ndarray,
                       tick: Callable[[str], None] | None = None) -> np.ndarray:
    """(N, C) probabilities → (N, C) boolean decisions: each item's top k labels, k maximising
    its expected F1 (ties: the smaller set; among equal probabilities, the lower column).
    `tick(message)` hears of each block of rows done (progress)."""
    probs = np.asarray(probs)
    n, c = probs.shape
    out = np.zeros((n, c), dtype=bool)
    # blocks of rows with a similar expected label count, so each block's count width fits
    order = np.argsort(probs.sum(axis=1), kind="stable")
    done = 0
    for rows in np.array_split(order, max(1, n * c // ROW_BLOCK)):
        p = np.clip(probs[rows].astype(np.float64), 0.0, 1.0)
        out[rows] = _top_sets(p, best_set_sizes(p))
        done += len(rows)
        if tick is not None:
            tick(f"gfm: {done}/{n} rows")
    return out


def _top_sets(p: np.ndarray, k: np.ndarray) -> np.ndarray:
    """Each row's k[row] largest entries (among equal ones, the lower columns): the first k of
    a stable descending sort, without sorting."""
    kth = np.empty(len(p))
    for size in np.unique(k):
        rows = np.flatnonzero(k == size)
        kth[rows] = -np.partition(-p[rows], size - 1, axis=1)[:, size - 1]
    above = p > kth[:, None]
    tied = p == kth[:, None]
    room = k - above.sum(axis=1)
    out = above | tied
    crowded = np.flatnonzero(tied.sum(axis=1) > room)  # more equal ones than room: lowest first
    out[crowded] = above[crowded] | (tied[crowded] & (np.cumsum(tied[crowded], axis=1)
                                                      <= room[crowded, None]))
    return out
