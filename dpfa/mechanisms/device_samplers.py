"""Triton device samplers ``f(seed, offsets, scale)`` used as ``tl.constexpr`` kernel arguments.

Each returns float32 noise of the given scale at each Philox counter ``offsets`` (any
integer block: int32, or int64 for tensors of more than 2**31 elements) under the key
``seed`` (an integer scalar, drawn per step from the OS CSPRNG by the caller): the same
(seed, offsets) gives the same noise, on every block shape (DESIGN.md 4). The torch
samplers of the mechanisms are their references; the tests compare the laws.

Counters. ``tl.randint4x(seed, offsets)`` runs Philox-4x32 on the counter
``(lo(offsets), hi(offsets), 0, 0)``. The Laplace sampler uses exactly that counter;
the discrete Gaussian, which needs several independent draws per element, puts its
round number and a tag in the last two counter words, ``(lo, hi, round, TAG + j)``, so
that every (element, round, draw) has its own counter and no two elements or rounds
share random bits.

Uniforms. ``tl.rand`` may return exactly 0 and has 31 random bits; the samplers here
never take ``log`` of it. They build ``u = (2**32 a + b + 1) / 2**64`` from two 32-bit
words ``a, b``, which lies in (0, 1] (never 0, so ``-log(u)`` is finite, at most
64 log 2 = 44.36) and satisfies ``P(u <= p) = p`` up to an absolute 2**-64 (plus the
rounding of the float type), so exponential tails are right out to about 40 scales.

Interpreter: everything here runs under ``TRITON_INTERPRET=1`` (no libdevice-only
functions: only ``tl.log``, ``tl.exp``, ``tl.sqrt``, ``tl.cos``, ``tl.sin``, ``tl.floor``,
``tl.abs``, ``tl.where``, ``tl.max`` and Philox).

Floating point: these are floating-point samplers. The discrete Gaussian computes in
float64 and returns exact integers (in float32, exact while ``|noise| < 2**24``, i.e.
for sigma up to about 3e5); the Gaussian (Box-Muller on 64-bit uniforms) and the Laplace
compute in float32, and, like every floating-point sampler of a continuous law, are
exposed to the floating-point attacks of Mironov (CCS 2012) on their low-order bits.
"""

from __future__ import annotations

import triton
import triton.language as tl

#: Philox counter tag of the discrete Gaussian streams (ASCII "DG"), in the 4th word.
DISCRETE_GAUSSIAN_TAG = 0x44470000
#: Rejection rounds of the device discrete Gaussian before it gives up on an element.
#: Each round accepts with probability >= 0.5578 whatever sigma (see its docstring), so
#: an element is still unaccepted after all rounds with probability
#: <= 0.4422^128 < 2**-150.
DISCRETE_GAUSSIAN_MAX_ROUNDS = 128

# the same numbers as compile-time constants for the @triton.jit code
_DG_TAG = tl.constexpr(DISCRETE_GAUSSIAN_TAG)
_DG_MAX_ROUNDS = tl.constexpr(DISCRETE_GAUSSIAN_MAX_ROUNDS)


@triton.jit
def _uniform_open0_f32(hi, lo):
    """u in (0, 1] from two uint32 words, in float32: (2^32 hi + lo + 1) 2^-64.

    ``hi * 2^-32`` carries the top bits; ``(lo + 1) * 2^-64`` matters only when ``hi`` is
    small, which is where float32 has the relative precision to keep it: the tail
    ``P(u <= p)`` is right down to p ~ 2^-64.
    """
    return hi.to(tl.float32) * 2.3283064365386963e-10 + (lo.to(tl.float32) + 1.0) * 5.421010862427522e-20


@triton.jit
def _uniform_open0_f64(hi, lo):
    """u in (0, 1] from two uint32 words, in float64: (2^32 hi + lo + 1) 2^-64."""
    return (hi.to(tl.float64) * 4294967296.0 + (lo.to(tl.float64) + 1.0)) * 5.421010862427522e-20


@triton.jit
def gaussian_pair_sampler(seed, pair_offsets, scale):
    """Two independent N(0, scale^2) values per counter: elements 2c and 2c + 1.

    Box-Muller on one Philox-4x32 call at counter c = ``pair_offsets``: u in (0, 1] from
    two words (64 bits, see the module docstring), angle 2 pi w / 2^32 from the third,
    r = sqrt(-2 log u); returns (r cos, r sin) times ``scale``. Why not ``tl.randn``: it
    clamps its uniform to >= 1e-7, so its normals never exceed 5.68 in magnitude; a
    Gaussian mechanism whose noise is cut there is not the Gaussian mechanism (outputs
    beyond the cut of one input have probability 0 under it and about 1e-8 per element
    under a neighbour, an unaccounted delta that grows with the number of noisy
    elements). Here r <= sqrt(2 * 64 log 2) = 9.42 and P(r > x) = e^{-x^2/2} is right to
    an absolute 2^-64. One Philox call and one log and sqrt serve two normals.
    """
    w0, w1, w2, _ = tl.randint4x(seed, pair_offsets)
    return _box_muller(w0, w1, w2, scale)


@triton.jit
def _box_muller(w0, w1, w2, scale):
    """(r cos t, r sin t) * scale, r = sqrt(-2 log u), u = (2^32 w0 + w1 + 1) 2^-64, t = 2 pi w2 / 2^32."""
    r = tl.sqrt(-2.0 * tl.log(_uniform_open0_f32(w0, w1))) * scale
    theta = w2.to(tl.float32) * 1.4629180792671596e-09  # 2 pi / 2^32
    return r * tl.cos(theta), r * tl.sin(theta)


@triton.jit
def gaussian_sampler(seed, offsets, scale):
    """N(0, scale^2) at each offset: element i is lane i mod 2 of ``gaussian_pair_sampler`` at
    counter i // 2 (so kernels that make the pairs at once give the same values)."""
    a, b = gaussian_pair_sampler(seed, offsets >> 1, scale)
    return tl.where((offsets & 1) == 0, a, b)


def pair_form(sampler):
    """The two-at-a-time form of a device sampler (element 2c and 2c + 1 from counter c),
    or None if it has none. Kernels that produce a row of noise use it when present."""
    return gaussian_pair_sampler if sampler is gaussian_sampler else None


@triton.jit
def laplace_sampler(seed, offsets, scale):
    """Lap(scale) at each offset: ``scale * S * E``, S = +-1 fair, E = -log(u) ~ Exp(1).

    A symmetric exponential is Laplace: P(S E > x) = e^{-x} / 2 for x >= 0. ``u`` is in
    (0, 1] (two Philox words, see the module docstring), so ``log(u)`` is finite
    (|noise| <= 44.4 scale) and the exponential tail is right to about 40 scales; the
    sign comes from a third word. Computed in float32.
    """
    w0, w1, w2, _ = tl.randint4x(seed, offsets)
    u = _uniform_open0_f32(w0, w1)
    e = -tl.log(u)
    sign = tl.where((w2 & 1) == 0, 1.0, -1.0)
    return sign * e * scale


@triton.jit
def discrete_gaussian_rounds(seed, offsets, scale, MAX_ROUNDS: tl.constexpr):
    """N_Z(0, sigma^2) by at most ``MAX_ROUNDS`` rejection rounds; 0 where none accepted.

    Algorithm (rejection from the discrete Laplace, as Canonne, Kamath & Steinke 2020,
    Alg. 3, but with the real parameter t = sigma and float64 arithmetic). In round
    r = 0, 1, ..., each element draws, from its own Philox counters
    ``(lo, hi, r, TAG)`` and ``(lo, hi, r, TAG + 1)``, three uniforms u1, u2, u3 in (0, 1]
    and forms

        G_i = floor(-t log u_i) (i = 1, 2),  Y = G1 - G2,
        accept  iff  -log u3 >= (|Y| - sigma)^2 / (2 sigma^2).

    The first accepted Y is the element's noise.

    Proof that an accepted Y is N_Z(0, sigma^2). With q = e^{-1/t},
    P(G >= k) = P(-log u >= k / t) = q^k, so G is geometric, P(G = g) = (1 - q) q^g, and
    Y = G1 - G2 is the discrete Laplace: P(Y = y) = sum_g (1-q)^2 q^{g + |y|} q^g
    = (1 - q)/(1 + q) q^{|y|}. Since -log u3 ~ Exp(1), the round accepts with
    probability A(y) = exp(-(|y| - sigma)^2 / (2 sigma^2)) <= 1. With t = sigma,

        P(Y = y, accept) = (1-q)/(1+q) e^{-|y|/sigma} e^{-y^2/(2 sigma^2) + |y|/sigma - 1/2}
                         = C e^{-y^2/(2 sigma^2)},     C = (1-q)/(1+q) e^{-1/2},

    which is proportional to the discrete Gaussian pmf. Rounds use disjoint counters,
    so (modelling Philox as random) they are independent and identically distributed,
    and the first accepted Y has law P(Y = y | accept) = N_Z(0, sigma^2)(y). The
    element's noise depends only on its own counters, not on when the loop over the
    block stops, so it is the same on every block shape.

    Failure. A round accepts with probability p(sigma) = C theta(sigma),
    theta = sum_y e^{-y^2/(2 sigma^2)}. p tends to e^{-1/2} = 0.607 as sigma -> 0 and to
    sqrt(pi/2) e^{-1/2} = 0.760 as sigma -> inf, and its minimum over sigma is 0.5578
    (at sigma ~ 0.371; the tests check p >= 0.5578 on a dense grid). The loop stops once
    every element of the block has accepted, or after ``MAX_ROUNDS`` rounds (128 in
    ``discrete_gaussian_sampler``); an element that has not accepted by then gets 0,
    which happens with probability <= (1 - 0.5578)^128 < 2^-150. The sampled law is therefore within total
    variation 2^-150 of N_Z(0, sigma^2) per element, and an (epsilon, delta)-DP release
    of n noisy values stays (epsilon, delta + (1 + e^epsilon) n 2^-150)-DP. A block of B
    elements runs about log(B) / log(1 / 0.44) rounds (about 8 for B = 1024).

    Floating point: u has 64 random bits and every step is float64, so the
    probabilities above are realised to about 2^-53 relative, and 2^-64 absolute,
    which is negligible in the region |y| < 35 sigma where the output has its mass
    (beyond it, below e^{-600}). sigma = 0 gives zeros (t is floored at 1e-150, where
    N_Z(0, t^2) is already the point mass at 0 up to e^{-10^299}).
    """
    # scale: a scalar argument or a block; adding a float64 zero promotes either, exactly
    # (tl.to_tensor is missing from Triton 3.6, which the GPU machines carry)
    sigma = scale + tl.zeros([], tl.float64)
    # t = sigma, kept away from 0 so that sigma = 0 needs no branch (every G is then 0).
    t = tl.maximum(sigma, 1e-150)
    inv_two_var = 0.5 / (t * t)
    lo = offsets.to(tl.uint32)
    zero = lo * 0
    if tl.constexpr(offsets.dtype.primitive_bitwidth) > 32:
        hi = (offsets >> 32).to(tl.uint32)
    else:
        hi = zero
    noise = tl.zeros(offsets.shape, tl.float64)
    pending = offsets == offsets
    r = 0
    while (r < MAX_ROUNDS) & (tl.max(pending.to(tl.int32), axis=None) > 0):
        a0, a1, a2, a3 = tl.philox(seed, lo, hi, zero + r, zero + _DG_TAG)
        b0, b1, _, _ = tl.philox(seed, lo, hi, zero + r, zero + (_DG_TAG + 1))
        g1 = tl.floor(-t * tl.log(_uniform_open0_f64(a0, a1)))
        g2 = tl.floor(-t * tl.log(_uniform_open0_f64(a2, a3)))
        y = g1 - g2
        d = tl.abs(y) - t
        accept = -tl.log(_uniform_open0_f64(b0, b1)) >= d * d * inv_two_var
        take = pending & accept
        noise = tl.where(take, y, noise)
        pending = pending & ~accept
        r += 1
    return noise.to(tl.float32)


@triton.jit
def discrete_gaussian_sampler(seed, offsets, scale):
    """N_Z(0, sigma^2), sigma = ``scale``, at each offset: integer values (as float32).

    ``discrete_gaussian_rounds`` with ``DISCRETE_GAUSSIAN_MAX_ROUNDS`` = 128 rounds; its
    docstring has the algorithm, the proof of the law and the failure bound.
    """
    return discrete_gaussian_rounds(seed, offsets, scale, _DG_MAX_ROUNDS)
