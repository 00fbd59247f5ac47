"""Uncertainty of accuracies: a seeded bootstrap over test images, and paired differences between methods.

A record keeps, for every evaluated split, which test images its method got right (`pack`: a bit
per image, in test order) and a digest of the test list (`items_digest`). Draw b of the bootstrap
resamples the n test images with replacement, the same draw for every vector scored on that test
list (`resampled_accuracy`): the seeds of a method and every method on the same images are resampled
together, so a difference of two methods is a paired bootstrap over the images they share. Distinct
test lists (base and novel, or two targets) are drawn independently, from their own digests.

    acc_b  = (1/n) Σ_i w_bi c_i        w_b ~ Multinomial(n, 1/n)  (how often image i is drawn)
    HM_b   = HM(acc_b(base), acc_b(novel))           (the same draws of base and novel)
    Δ_b    = acc_b(method) − acc_b(reference)        (paired: the same w_b)
    interval = the (1 − level)/2 and (1 + level)/2 quantiles of the draws   (percentile bootstrap)

Seed means (and dataset or target averages, HM of averaged base and novel) are taken draw by draw,
exactly as the point estimate is taken from the accuracies. The bootstrap's seed and number of
draws are our choice (`SEED`, `DRAWS`), stored in each record with its intervals.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

SEED = 0
DRAWS = 2000
LEVEL = 0.95
_CELLS_PER_CHUNK = 2_000_000  # index draws held at once (memory), a function of n only: same stream for any k


def pack(correct: Sequence[bool]) -> str:
    """Per-image correctness as a hex string: bit i (most significant first) is test image i."""
    return np.packbits(np.asarray(correct, dtype=bool)).tobytes().hex()


def unpack(bits: str, n: int) -> np.ndarray:
    """The n booleans `pack` wrote."""
    packed = np.frombuffer(bytes.fromhex(bits), dtype=np.uint8)
    if len(packed) != math.ceil(n / 8):
        raise ValueError(f"correctness bits hold {8 * len(packed)} images, the record says {n}")
    return np.unpackbits(packed, count=n).astype(bool)


def items_digest(items: Sequence) -> str:
    """A digest (16 hex digits) of a test list in order: each image's folder and file name, and its label
    (not the data root, so the same list has the same digest wherever the data lives)."""
    text = "\n".join(f"{Path(d.impath).parent.name}/{Path(d.impath).name}\t{d.label}" for d in items)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def resample_indices(n: int, test: str, seed: int = SEED, draws: int = DRAWS) -> Iterator[np.ndarray]:
    """The bootstrap's draws of image indices [rows, n] for the test list with digest `test`, chunk by chunk."""
    rng = np.random.default_rng([seed, int(test, 16)])
    rows = max(1, _CELLS_PER_CHUNK // max(n, 1))
    for start in range(0, draws, rows):
        yield rng.integers(0, n, size=(min(rows, draws - start), n))


def resampled_accuracy(correct: np.ndarray, test: str, seed: int = SEED, draws: int = DRAWS) -> np.ndarray:
    """Bootstrap draws of accuracy [draws] of a correctness vector [n], or [draws, k] of k vectors [n, k] scored
    on the same test list (digest `test`): every vector gets the same resampled images."""
    x = np.asarray(correct, dtype=float)
    n = x.shape[0]
    if n == 0:
        raise ValueError("no test images to resample")
    flat = x.reshape(n, -1)
    out = []
    for idx in resample_indices(n, test, seed, draws):
        rows = idx.shape[0]
        weights = np.bincount((np.arange(rows)[:, None] * n + idx).ravel(), minlength=rows * n).reshape(rows, n)
        out.append(weights @ flat / n)
    acc = np.concatenate(out)
    return acc.reshape(draws, *x.shape[1:])


def interval(draws: np.ndarray, level: float = LEVEL) -> tuple[float, float]:
    """The percentile interval of bootstrap draws."""
    lo, hi = np.quantile(np.asarray(draws, dtype=float), [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def excludes_zero(lo: float, hi: float) -> bool:
    """Whether an interval of a difference lies on one side of 0 (the difference is distinguishable)."""
    return bool(lo > 0 or hi < 0)


def mean_draws(draws: Sequence[np.ndarray | None]) -> np.ndarray | None:
    """Draw-by-draw mean of several statistics' draws (None if any has none)."""
    draws = list(draws)
    if not draws or any(d is None for d in draws):
        return None
    return np.mean(np.stack(draws), axis=0)


def harmonic_mean(base, novel):
    """HM = 2 b n / (b + n), the base-to-novel summary (0 when both are 0); of numbers, or of arrays
    element by element (bootstrap draws)."""
    total = np.add(base, novel)
    return 2 * np.multiply(base, novel) / np.where(total > 0, total, 1)


def record_draws(df: "pd.DataFrame", draws: int = DRAWS, seed: int = SEED) -> list[np.ndarray | None]:
    """Bootstrap draws of accuracy (in %) for every row of `results.collect`: an evaluated split's from its
    correctness bits, every row on the same test list resampled together; a record's HM from its base and
    novel draws, a transfer record's average from its targets' (as `metrics` are); None where a record has
    no bits (written before they were)."""
    out: list[np.ndarray | None] = [None] * len(df)
    if "correct" not in df.columns:
        return out
    df = df.reset_index(drop=True)  # positions
    evaluated = df["correct"].notna() & df["test"].notna()
    for test, rows in df[evaluated].groupby("test", sort=False):
        bits = np.stack([unpack(b, int(n)) for b, n in zip(rows["correct"], rows["n"])], axis=1)
        acc = 100 * resampled_accuracy(bits, test, seed, draws)
        for j, i in enumerate(rows.index):
            out[i] = acc[:, j]
    for _, rows in df.groupby("record", sort=False):
        by_split = {s: out[i] for s, i in zip(rows["split"], rows.index)}
        for split, i in zip(rows["split"], rows.index):
            if split == "hm" and by_split.get("base") is not None and by_split.get("novel") is not None:
                out[i] = harmonic_mean(by_split["base"], by_split["novel"])
            elif split == "average" and rows["protocol"].iloc[0] in ("cross_dataset", "domain_generalization"):
                source = rows["dataset"].iloc[0]
                out[i] = mean_draws([d for s, d in by_split.items() if s not in (source, "average")])
    return out
