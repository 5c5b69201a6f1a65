"""Shared statistical law tests of the sampler suites."""

import numpy as np
from scipy import stats

from dpfa.mechanisms import discrete_gaussian as dg


def chi2_vs_discrete_gaussian(x, sigma):
    """p-value of Pearson's chi-square of integer samples against N_Z(0, sigma^2).

    Cells: each integer with expected count >= 5, plus the two tails pooled into one cell
    (merged into the outermost cells when its expected count is below 5).
    """
    x = np.asarray(x, dtype=np.int64)
    k = np.arange(-int(12 * sigma) - 2, int(12 * sigma) + 3)
    expected = dg.pmf(k, sigma) * len(x)
    keep = expected >= 5
    kk = k[keep]
    lo, hi = kk[0], kk[-1]
    counts = np.bincount(np.clip(x, lo - 1, hi + 1) - (lo - 1), minlength=hi - lo + 3)
    o = np.append(counts[1:-1], counts[0] + counts[-1])
    e = np.append(expected[keep], len(x) - expected[keep].sum())
    if e[-1] < 5:
        o, e = o[:-1], e[:-1]
        o[-1] += counts[0] + counts[-1]
        e[-1] += len(x) - expected[keep].sum()
    return stats.chisquare(o, e).pvalue
