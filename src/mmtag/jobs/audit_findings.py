"""What `mmtag audit` finds in a training CSV: label errors, duplicates, leaks, outliers.

Built on what cross-fitting already gives: an out-of-fold probability of every label for every
training row (scored by the fold head that never saw the row) and the cached features of every
image and caption. The estimators are the field's, not re-derived here:
* label errors: cleanlab's confident learning for multi-label data
  (`cleanlab.multilabel_classification`): which (row, label) pairs are off, per class
  (`find_multilabel_issues_per_class`), ranked by the per-class label quality (self-confidence);
* near duplicates and outliers: nearest neighbours in the feature space (scikit-learn's
  `NearestNeighbors`, cosine, k neighbours: memory linear in rows, never an n x n matrix)
  feeding cleanlab's `OutOfDistribution` score as its `knn`; near-duplicate images by their
  perceptual hashes (imagehash), compared in blocks of rows;
* exact duplicates and leaks need no model: an image is its file's bytes, a caption its text
  (`data.groups`).
Every finding is an `Issue`; `fixes` turns them into label changes. `jobs.audit` writes them
out (issues.csv, a corrected copy of the CSV) and `jobs.audit_page` draws audit.html.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np

from ..config import AUDIT_FIX_MIN_SCORE
from ..data import Dataset, caption_identity, image_keys
from ..errors import MmtagError

log = logging.getLogger("mmtag")

# The kinds of issue, in the order the outputs list them.
KINDS = ("wrong label", "missing label", "conflicting duplicate", "exact duplicate",
         "near duplicate", "leak", "outlier")
NEIGHBOURS = 5  # nearest neighbours per row (cleanlab's outlier score reads them too)
# Two different image files are "near duplicates" when their perceptual hashes (imagehash's
# 64-bit pHash) differ in at most this many bits. On coco-real a copy resized to 70 % and
# re-encoded at JPEG quality 60 differs in at most 2 bits, while no two distinct images differ
# in fewer than 10 (docs/results.md); the encoders' pooled features do not separate them (copies
# 0.55-0.89 cosine-similar, distinct neighbours up to 0.94).
NEAR_BITS = 6
OUTLIER_SHARE = 0.005  # the least typical rows flagged as outliers (at least one)
RARE_ROWS = 10  # a label on fewer rows cannot be learned out of fold (2 per fold at 5 folds)
FIX_MIN_SCORE = AUDIT_FIX_MIN_SCORE


@dataclass
class Issue:
    """One suspected problem. `row` is the CSV's 1-based data row; `score` in [0, 1], higher
    is more likely a real problem (for label issues: the out-of-fold probability against the
    given label); `other` the row it duplicates or leaks from (0: none)."""

    row: int
    image_id: str
    kind: str
    label: str  # the label concerned, as the CSV spells it ("" when not about one label)
    evidence: str
    score: float
    other: int = 0
    other_file: str = ""  # the file `other` is a row of, for leaks (a test CSV)


@dataclass
class LabelStats:
    """One label's line of the audit: how many rows carry it, how many of its labels look
    wrong or missing, and whether it is too rare to learn."""

    label: str
    rows: int
    wrong: int
    missing: int

    @property
    def noise_rate(self) -> float:
        """Suspected errors of this label per row that carries it (an upper estimate: the
        missing ones are rows that should carry it)."""
        return (self.wrong + self.missing) / max(self.rows, 1)

    @property
    def rare(self) -> bool:
        return self.rows < RARE_ROWS


@dataclass
class AuditResult:
    data: Dataset
    issues: list[Issue]
    labels: list[LabelStats]
    probs: np.ndarray  # out-of-fold, (rows, labels)
    label_tokens: list[str]
    tests: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: sum(1 for i in self.issues if i.kind == k) for k in KINDS}


# ----------------------------------------------------------------------------- finding
def label_issues(y: np.ndarray, probs: np.ndarray, data: Dataset,
                 tokens: list[str]) -> list[Issue]:
    """(row, label) pairs confident learning finds off: given but unlikely ("wrong label"),
    likely but not given ("missing label"); most likely first."""
    from cleanlab.multilabel_classification.filter import find_multilabel_issues_per_class
    from cleanlab.multilabel_classification.rank import get_label_quality_scores_per_class

    probs = np.clip(probs, 1e-6, 1 - 1e-6)
    present = y.sum(axis=0) > 0  # cleanlab needs each class seen; an unseen one has no issue
    flagged = np.zeros(y.shape, dtype=bool)
    quality = np.ones(y.shape)
    if present.sum() >= 2:
        cols = np.flatnonzero(present)
        sub = [list(np.flatnonzero(row[cols])) for row in y]
        flagged[:, cols] = find_multilabel_issues_per_class(sub, probs[:, cols], n_jobs=1)
        quality[:, cols] = get_label_quality_scores_per_class(sub, probs[:, cols])
    out = []
    for i, k in zip(*np.nonzero(flagged)):
        wrong = bool(y[i, k])
        out.append(Issue(row=_row(data, i), image_id=data.image_ids[i],
                         kind="wrong label" if wrong else "missing label", label=tokens[k],
                         evidence=f"out-of-fold probability {probs[i, k]:.3f}",
                         score=float(1 - quality[i, k])))
    return out


def duplicate_issues(data: Dataset, y: np.ndarray, image_keys: list[str] | None) -> list[Issue]:
    """Rows repeating an earlier row: the same image bytes and caption with the same labels
    ("exact duplicate"), or the same image (or, without images, the same caption) with other
    labels ("conflicting duplicate"). Several captions of one image with the same labels are a
    caption group, not an issue."""
    out = []
    first_image: dict[str, int] = {}
    first_pair: dict[tuple[str, str], int] = {}
    first_caption: dict[str, int] = {}
    for i in range(len(data)):
        cap = caption_identity(data.captions[i])
        if image_keys is not None:
            key = image_keys[i]
            j = first_pair.setdefault((key, cap), i)
            if j != i and np.array_equal(y[i], y[j]):
                out.append(_dup(data, i, j, "exact duplicate", "same image bytes and caption", 1.0))
                continue
            j = first_image.setdefault(key, i)
            if j != i and not np.array_equal(y[i], y[j]):
                out.append(_dup(data, i, j, "conflicting duplicate",
                                "same image bytes, other labels", 1.0))
        else:
            j = first_caption.setdefault(cap, i)
            if j != i and not np.array_equal(y[i], y[j]):
                # without the images, two rows may be two pictures described alike
                out.append(_dup(data, i, j, "conflicting duplicate",
                                "same caption, other labels (no images to compare)", 0.5))
            elif j != i and data.image_ids[i] == data.image_ids[j]:
                out.append(_dup(data, i, j, "exact duplicate", "same ImageID and caption", 1.0))
    return out


def _dup(data: Dataset, i: int, j: int, kind: str, why: str, score: float) -> Issue:
    return Issue(row=_row(data, i), image_id=data.image_ids[i], kind=kind, label="",
                 evidence=f"{why} as row {_row(data, j)} ({data.image_ids[j]})", score=score,
                 other=_row(data, j))


def neighbours(features: np.ndarray, queries: np.ndarray | None = None,
               k: int = NEIGHBOURS) -> tuple[np.ndarray, np.ndarray, object]:
    """Cosine similarities and indices of each query's k nearest rows of `features` (a query
    that is a row of `features` excludes itself), and the fitted neighbour index."""
    from sklearn.neighbors import NearestNeighbors

    f = _unit(features)
    k = min(k, len(f) - (1 if queries is None else 0))
    knn = NearestNeighbors(n_neighbors=max(k, 1), metric="cosine").fit(f)
    if queries is None:
        dist, idx = knn.kneighbors(n_neighbors=max(k, 1))  # excludes each row itself
    else:
        dist, idx = knn.kneighbors(_unit(queries), n_neighbors=max(k, 1))
    return 1.0 - dist, idx, knn


def image_hashes(data: Dataset) -> np.ndarray | None:
    """Each row's 64-bit perceptual hash (imagehash's pHash of a small decoded copy), or None
    for data without images; an unreadable image hashes to all ones, near nothing."""
    import imagehash

    from ..data import ImageDecodeError, decode_thumbnail

    if data.images_dir is None:
        return None
    out = np.full(len(data), np.iinfo(np.uint64).max, dtype=np.uint64)
    for i in range(len(data)):
        try:
            bits = imagehash.phash(decode_thumbnail(data.image_path(i), 128)).hash.flatten()
        except (ImageDecodeError, OSError, MmtagError):
            continue
        out[i] = np.packbits(bits).view(">u8")[0]
    return out


def nearest_hash(queries: np.ndarray, hashes: np.ndarray, *, before: bool,
                 block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each query hash, the fewest differing bits to a hash of `hashes` and that row (with
    `before`, queries are `hashes` themselves and only earlier rows count), in blocks of rows so
    memory stays block x rows."""
    best = np.full(len(queries), 65, dtype=np.int64)
    where = np.full(len(queries), -1, dtype=np.int64)
    for a in range(0, len(queries), block):
        q = queries[a:a + block]
        bits = np.bitwise_count(q[:, None] ^ hashes[None, :]).astype(np.int64)
        if before:
            rows = np.arange(a, a + len(q))[:, None]
            bits[np.arange(len(hashes))[None, :] >= rows] = 65
        where[a:a + len(q)] = bits.argmin(axis=1)
        best[a:a + len(q)] = bits.min(axis=1)
    return best, where


def near_duplicate_issues(data: Dataset, hashes: np.ndarray, image_keys: list[str]) -> list[Issue]:
    """Rows whose image is another file than an earlier row's but near the same picture
    (perceptual hashes at most NEAR_BITS apart): a resized or re-encoded copy."""
    bits, other = nearest_hash(hashes, hashes, before=True)
    out = []
    for i in np.flatnonzero(bits <= NEAR_BITS):
        j = int(other[i])
        if image_keys[i] != image_keys[j]:
            out.append(_dup(data, int(i), j, "near duplicate",
                            f"perceptual hash {bits[i]} of 64 bits from", 1 - bits[i] / 64))
    return out


def outlier_issues(data: Dataset, features: np.ndarray, knn: object) -> list[Issue]:
    """The least typical rows by cleanlab's out-of-distribution score on the features (the
    average distance to their nearest neighbours)."""
    from cleanlab.outlier import OutOfDistribution

    if len(data) <= NEIGHBOURS + 1:
        return []
    scores = OutOfDistribution(params={"knn": knn}).score(features=_unit(features))
    n = max(1, int(round(OUTLIER_SHARE * len(data))))
    return [Issue(row=_row(data, int(i)), image_id=data.image_ids[i], kind="outlier", label="",
                  evidence=f"typicality {scores[i]:.3f} (lowest {n} of {len(data)})",
                  score=float(1 - scores[i])) for i in np.argsort(scores)[:n]]


def leak_issues(data: Dataset, image_keys: list[str] | None, hashes: np.ndarray | None,
                test: Dataset, test_keys: list[str] | None,
                test_hashes: np.ndarray | None) -> list[Issue]:
    """Rows of a test/validation CSV that are training rows too: the same image bytes, a
    near-identical image (perceptual hashes at most NEAR_BITS apart) or the same caption. Each
    names the test row and its training twin."""
    out = []
    by_key: dict[str, int] = {}
    for i, k in enumerate(image_keys or []):
        by_key.setdefault(k, i)  # the first training row of each image and caption
    by_caption: dict[str, int] = {}
    for i, c in enumerate(data.captions):
        by_caption.setdefault(caption_identity(c), i)
    near = None
    if hashes is not None and test_hashes is not None and len(data) > 0:
        near = nearest_hash(test_hashes, hashes, before=False)
    for t in range(len(test)):
        j, why, score = None, "", 0.0
        if test_keys is not None and test_keys[t] in by_key:
            j, why, score = by_key[test_keys[t]], "same image bytes as training row", 1.0
        elif near is not None and near[0][t] <= NEAR_BITS:
            j, score = int(near[1][t]), 1 - near[0][t] / 64
            why = f"perceptual hash {near[0][t]} of 64 bits from training row"
        elif caption_identity(test.captions[t]) in by_caption:
            j, why, score = by_caption[caption_identity(test.captions[t])], "same caption as training row", 0.9
        if j is not None:
            out.append(Issue(row=_row(test, t), image_id=test.image_ids[t], kind="leak", label="",
                             evidence=f"{test.path.name} row {_row(test, t)}: {why} {_row(data, j)} "
                                      f"({data.image_ids[j]})",
                             score=score, other=_row(data, j), other_file=str(test.path)))
    return out


def label_table(y: np.ndarray, issues: list[Issue], tokens: list[str]) -> list[LabelStats]:
    stats = []
    for k, token in enumerate(tokens):
        wrong = sum(1 for i in issues if i.kind == "wrong label" and i.label == token)
        missing = sum(1 for i in issues if i.kind == "missing label" and i.label == token)
        stats.append(LabelStats(label=token, rows=int(y[:, k].sum()), wrong=wrong, missing=missing))
    return stats


def image_keys_of(data: Dataset) -> list[str] | None:
    """Each row's image identity (`data.image_keys`), or None for data without images."""
    return None if data.images_dir is None else image_keys(data)


def find_issues(data: Dataset, y: np.ndarray, probs: np.ndarray, tokens: list[str],
                features: dict[str, np.ndarray], tests: list[Dataset]) -> AuditResult:
    """Every kind of issue in `data` (labels `y`, out-of-fold `probs`, features by modality),
    and leaks into each test dataset, each kind ranked most likely first."""
    keys = image_keys_of(data)
    hashes = image_hashes(data)
    issues = label_issues(y, probs, data, tokens) + duplicate_issues(data, y, keys)
    if hashes is not None and keys is not None:
        issues += near_duplicate_issues(data, hashes, keys)
    if features:
        both = np.concatenate([_unit(f) for f in features.values()], axis=1)
        _, _, knn = neighbours(both)
        issues += outlier_issues(data, both, knn)
    for test in tests:
        issues += leak_issues(data, keys, hashes, test, image_keys_of(test), image_hashes(test))
    issues.sort(key=lambda i: (KINDS.index(i.kind), -i.score, i.row))
    return AuditResult(data=data, issues=issues, labels=label_table(y, issues, tokens),
                       probs=probs, label_tokens=tokens, tests=[str(t.path) for t in tests])


def _unit(f: np.ndarray) -> np.ndarray:
    f = np.asarray(f, dtype=np.float32)
    return f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)


def _row(data: Dataset, i: int) -> int:
    return data.rows[i] if data.rows else i + 1


@dataclass
class Change:
    row: int
    image_id: str
    before: list[str]
    after: list[str]
    why: str


def fixes(result: AuditResult, y: np.ndarray, min_score: float = FIX_MIN_SCORE) -> list[Change]:
    """The label changes `--fix` makes: each label issue scoring at least `min_score` (a
    missing label added, a wrong one removed, never leaving a row without labels), and each
    conflicting duplicate of the same image given the labels of the copy the out-of-fold
    scores agree with most."""
    data, tokens = result.data, result.label_tokens
    rows = {(_row(data, i)): i for i in range(len(data))}
    new = y.astype(bool).copy()
    why: dict[int, list[str]] = {}
    for issue in result.issues:
        i = rows.get(issue.row)
        if i is None:
            continue
        if issue.kind in ("wrong label", "missing label") and issue.score >= min_score:
            k = tokens.index(issue.label)
            if issue.kind == "wrong label" and new[i].sum() <= 1:
                continue
            new[i, k] = issue.kind == "missing label"
            why.setdefault(i, []).append(f"{issue.kind} {issue.label} ({issue.evidence})")
        elif issue.kind == "conflicting duplicate" and issue.score >= min_score:
            j = rows[issue.other]
            agree = [float(np.mean(np.abs(result.probs[r] - y[r]))) for r in (i, j)]
            keep, change = (i, j) if agree[0] < agree[1] else (j, i)
            if not np.array_equal(new[change], y[keep].astype(bool)):
                new[change] = y[keep].astype(bool)
                why.setdefault(change, []).append(
                    f"conflicting duplicate of row {_row(data, keep)}: its labels, which the "
                    "out-of-fold scores agree with more")
    out = []
    for i in sorted(why):
        if np.array_equal(new[i], y[i].astype(bool)):
            continue
        before = [tokens[k] for k in np.flatnonzero(y[i])]
        after = [tokens[k] for k in np.flatnonzero(new[i])]
        out.append(Change(row=_row(data, i), image_id=data.image_ids[i], before=before,
                          after=after, why="; ".join(why[i])))
    return out
