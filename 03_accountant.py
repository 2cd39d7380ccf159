"""Chapter 03 — Where epsilon comes from: a privacy accountant for DP-SGD, written from scratch

What you learn: how the (epsilon, delta) that DPDM reports follows from its DP-SGD settings,
the Poisson sampling rate q, the noise multiplier s and the number of steps T. Renyi DP (RDP)
of one subsampled Gaussian step, composed over T steps and converted to (epsilon, delta); the
smallest noise multiplier that reaches a target epsilon; then, going further, a tight
accountant that needs less noise for the same guarantee, and an audit that attacks DP-SGD.

Each DP-SGD step (DPDM Sec. 2) samples every example with probability q, clips its gradient to
norm C and adds N(0, s^2 C^2 I): with mu0 = N(0, s^2) and mu = (1-q) mu0 + q N(1, s^2), the
output's law without and with one example, in units of C:
 (1) RDP of one step at order a > 1 (Mironov, Talwar, Zhang 2019, Sec. 3.3):
       RDP(a) = log(A_a) / (a - 1),   A_a = E_{z ~ mu0}[(mu(z) / mu0(z))^a];   q = 1: a / (2 s^2).
     Integer a (their case I), every term >= 0:
       A_a - 1 = sum_{k>=2} C(a,k) q^k (1-q)^(a-k) (exp(k(k-1) / (2 s^2)) - 1).
     Fractional a (case II): with r = exp((2z-1) / (2 s^2)), split at z0 = s^2 log(1/q - 1) + 1/2
     (where q r = 1 - q) and expand (1 - q + q r)^a in the smaller term on each side:
       A_a = sum_i C(a,i) (1-q)^(a-i) q^i     exp((i^2-i) / (2 s^2)) Phi((z0 - i) / s)
           + sum_i C(a,i) q^(a-i)     (1-q)^i exp((j^2-j) / (2 s^2)) Phi((j - z0) / s),  j = a - i.
 (2) Composition: RDP adds up over steps and schedule segments (Mironov 2017, Prop. 1).
 (3) (eps, delta), minimised over the orders a (Balle et al. 2020, Thm. 21):
       eps = T RDP(a) + log((a-1)/a) - (log delta + log a) / (a-1);
     Mironov 2017, Prop. 3, has the looser eps = T RDP(a) + log(1/delta) / (a-1).
 (4) Noise-multiplier calibration: the smallest s with eps(s) <= target, to 1e-6 relative: the
     upper end of a shrinking bracket, so it never overshoots the target.
 (5) Tight accountant: the privacy loss L = log(P/Q) of one step has a distribution (PLD);
     discretised pessimistically and composed by one FFT, it gives
       delta(eps) = E[(1 - e^(eps - L))+]   (Koskela et al. 2020; Doroshenko et al. 2022),
     at q = 1 the exact curve of the Gaussian mechanism (Balle & Wang 2018, Thm. 8):
       delta(eps) = Phi(1/(2s) - eps s) - e^eps Phi(-1/(2s) - eps s).
 (6) One-run audit (Steinke, Nasr, Jagielski 2023): m canaries, r guesses, v of them right; an
     (eps, 0)-DP mechanism is right w.p. <= e^eps / (1 + e^eps) each time, so a large v
     refutes eps at a chosen significance: a statistical LOWER bound eps_LB.
Run:  python 03_accountant.py            (DPDM's noise multipliers, tight column, figure)
      python 03_accountant.py --audit    (audit of correct and broken DP-SGD, its figure)
      python 03_accountant.py --noise-multiplier 2.5 --batch-size 4096 --n 60000 --epochs 300
      python 03_accountant.py --target-epsilon 1 --q 0.01 --steps 10000 --delta 1e-5
"""
import argparse
import math
import pathlib
import time
import warnings

import numpy as np

# Opacus' DEFAULT_ALPHAS (opacus/accountants/rdp.py): 1.1..10.9 in steps of 0.1, then 12..63.
OPACUS_ORDERS = np.array([1 + x / 10 for x in range(1, 100)] + list(range(12, 64)), dtype=float)
# Ours adds 11, the integers to 100 (at small eps the best order lies beyond Opacus' 63) and a
# sparse tail to 256.
DEFAULT_ORDERS = np.concatenate([OPACUS_ORDERS[:99], [11], OPACUS_ORDERS[99:], np.arange(64, 101),
                                 [112, 128, 160, 192, 224, 256]]).astype(float)


def check_inputs(q=None, noise_multiplier=None, delta=None, epsilon=None, steps=None):
    """A DP bug is a security bug: refuse nonsense loudly, and say what to pass instead."""
    if q is not None and not 0 <= q <= 1:
        raise ValueError(f"sampling rate q={q} must lie in [0, 1] (q = batch size / dataset size)")
    if noise_multiplier is not None and not noise_multiplier > 0:
        raise ValueError(f"noise_multiplier={noise_multiplier} must be > 0 (0 gives no privacy)")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"delta={delta} must lie in (0, 1); take delta < 1/N, e.g. 1e-5")
    if epsilon is not None and not epsilon > 0:
        raise ValueError(f"target epsilon={epsilon} must be > 0")
    if steps is not None and not (steps >= 0 and float(steps).is_integer()):
        raise ValueError(f"steps={steps} must be a non-negative integer")


# ============================================================ Part 1: the RDP accountant
# ------------------------------------------------------------------ 1. RDP of one step
def log_normal_cdf(x):
    """log Phi(x) for an array, accurate far into both tails (numpy has no erfc; torch does).
    torch is imported where it is used, so that a mistyped flag is refused before its import."""
    import torch
    return torch.special.log_ndtr(torch.as_tensor(x, dtype=torch.float64)).numpy()


def signed_logsumexp(log_abs, sign):
    """log(sum sign * exp(log_abs)) along the last axis; the sums here are positive overall."""
    m = np.max(log_abs, axis=-1, keepdims=True)
    m = np.where(np.isfinite(m), m, 0.0)
    return np.log(np.sum(sign * np.exp(log_abs - m), axis=-1)) + m[..., 0]


def log_a_integer(q, noise_multiplier, alphas):
    """log A_a for integer orders: binomial expansion of A_a - 1, every term >= 0."""
    s = noise_multiplier
    a = np.asarray(alphas, dtype=int)[:, None]
    k = np.arange(2, a.max() + 1)[None, :]
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, a.max() + 1)))])
    x = k * (k - 1) / (2 * s**2)  # log(e^x - 1) = x + log(1 - e^-x), stable for any x > 0
    log_terms = (log_fact[a] - log_fact[k] - log_fact[np.maximum(a - k, 0)] + k * math.log(q)
                 + (a - k) * math.log1p(-q) + x + np.log(-np.expm1(-x)))
    log_terms = np.where(k <= a, log_terms, -np.inf)
    return np.logaddexp(0.0, signed_logsumexp(log_terms, 1.0))  # log(1 + (A - 1))


def log_a_fractional(q, noise_multiplier, alphas, n_terms=32):
    """log A_a for fractional orders by the two series above, in log space with signs.
    A_a is close to 1 when q is tiny or s large, so we sum A_a - 1 directly: subtract
    E[1 + a q (r - 1)] = 1 (as E[r] = 1) on both sides of z0; this changes the terms i = 0, 1
    of the first series and adds two terms. Beyond i > a + 1 the terms alternate in sign and
    shrink (slowly, ~i^-(a+2), when s is small), and such a tail is smaller than its first
    term: orders whose last terms are not yet below e^-30 (A_a - 1) are redone with twice the
    terms, and the size of the last terms is added: the result is an upper bound. Near q = 1/2
    z0 is small and the Phi factors cut nothing before i ~ several s: orders not done with
    4096 terms (large s) go to quadrature, which is accurate there."""
    s = noise_multiplier
    a, i = np.asarray(alphas, dtype=float)[:, None], np.arange(n_terms)[None, :]
    j = a - i
    log_q, log_1mq = math.log(q), math.log1p(-q)
    z0 = s**2 * (log_1mq - log_q) + 0.5
    # log|C(a,i)| = sum_{m<i} log|a - m| - log i!;  C(a,i) < 0 iff i - floor(a) - 1 is odd > 0
    log_binom = (np.cumsum(np.hstack([0 * a, np.log(np.abs(j))[:, :-1]]), axis=1)
                 - np.cumsum(np.log(np.maximum(i, 1))))
    sign = np.where(i > np.floor(a) + 1, (-1.0) ** (i - np.floor(a) - 1), 1.0)
    log_s1 = (log_binom + i * log_q + j * log_1mq + (i * i - i) / (2 * s**2)
              + log_normal_cdf((z0 - i) / s))
    log_s2 = (log_binom + j * log_q + i * log_1mq + (j * j - j) / (2 * s**2)
              + log_normal_cdf((j - z0) / s))
    # z < z0: i = 0, 1 become ((1-q)^a - 1 + a q) Phi(z0/s) >= 0 and
    # a q ((1-q)^(a-1) - 1) Phi((z0-1)/s) < 0
    a, sign1 = a[:, 0], sign.copy()
    log_s1[:, 0] = np.log(np.maximum(np.expm1(a * log_1mq) + a * q, 0)) + log_normal_cdf(z0 / s)
    log_s1[:, 1] = (np.log(a * q) + np.log(-np.expm1((a - 1) * log_1mq))
                    + log_normal_cdf((z0 - 1) / s))
    sign1[:, 1] = -1.0
    # z > z0: minus (1 - a q) P(z > z0) + a q E[r; z > z0]
    log_c = np.stack([np.log(np.abs(1 - a * q)) + log_normal_cdf(-z0 / s),
                      np.log(a * q) + log_normal_cdf((1 - z0) / s)], axis=1)
    sign_c = np.stack([-np.sign(1 - a * q), -np.ones_like(a)], axis=1)
    with np.errstate(invalid="ignore"):  # too few terms can leave a partial sum < 0: NaN, redo
        log_a_minus_1 = signed_logsumexp(np.hstack([log_s1, log_s2, log_c]),
                                         np.hstack([sign1, sign, sign_c]))
        last = np.logaddexp(log_s1[:, -1], log_s2[:, -1])
        out = np.logaddexp(0.0, np.logaddexp(log_a_minus_1, last))
    # "not (last < ...)" is also True for NaN: too few terms can sum to < 0 (at q = 1/2)
    redo = ~(last < log_a_minus_1 - 30) | (n_terms <= a + 1)
    if redo.any() and n_terms < 4096:
        out[redo] = log_a_fractional(q, s, a[redo], 2 * n_terms)
    elif redo.any():
        out[redo] = log_a_quadrature(q, s, a[redo])
    return out


def log_a_quadrature(q, noise_multiplier, alphas, n=20001):
    """log A_a by the trapezoid rule on A_a - 1 = E_{z ~ mu0}[(1-q+q r)^a - 1 - a q (r - 1)]
    (the subtracted term has mean 0, so nothing cancels). Used where the series converge too
    slowly, i.e. at large s: there the integrand varies on the scale s^2 and the grid step
    is about s / 700, the tails beyond 14 s are < e^-98, so the rule is accurate to ~1e-12;
    A_a - 1 is raised by 1e-9 relative to stay an upper bound."""
    s, a = noise_multiplier, np.asarray(alphas, dtype=float)[:, None]
    z = np.linspace(-14 * s, a.max() + 14 * s, n)  # r^a mu0 is centred at z = a
    r_minus_1 = np.expm1((2 * z - 1) / (2 * s * s))
    integrand = np.expm1(a * np.log1p(q * r_minus_1)) - a * q * r_minus_1
    weights = np.exp(-z**2 / (2 * s * s)) * (z[1] - z[0]) / (s * math.sqrt(2 * math.pi))
    return np.log1p(integrand @ weights * (1 + 1e-9))


def rdp_subsampled_gaussian(q, noise_multiplier, alpha):
    """RDP of one step of the Poisson-subsampled Gaussian mechanism at order(s) alpha > 1."""
    check_inputs(q=q, noise_multiplier=noise_multiplier)
    alpha = np.atleast_1d(np.asarray(alpha, dtype=float))
    if np.any(alpha <= 1):
        raise ValueError("RDP orders must be > 1")
    if q == 0:
        return np.zeros_like(alpha)
    if q == 1:
        return alpha / (2 * noise_multiplier**2)
    is_int = alpha == np.round(alpha)
    log_a = np.empty_like(alpha)
    log_a[~is_int] = log_a_fractional(q, noise_multiplier, alpha[~is_int])
    if is_int.any():
        log_a[is_int] = log_a_integer(q, noise_multiplier, alpha[is_int])
    return log_a / (alpha - 1)


# ------------------------------------------------------------------ 2. composition
def compute_rdp(q, noise_multiplier, steps, orders=DEFAULT_ORDERS):
    """RDP of `steps` compositions: RDP adds up (Mironov 2017, Prop. 1)."""
    check_inputs(steps=steps)
    return steps * rdp_subsampled_gaussian(q, noise_multiplier, orders)


def compute_rdp_schedule(segments, orders=DEFAULT_ORDERS):
    """A schedule of (q, noise_multiplier, steps) segments, e.g. a warm-up with another batch."""
    return sum(compute_rdp(q, nm, steps, orders) for q, nm, steps in segments)


# ------------------------------------------------------------------ 3. RDP -> (eps, delta)
def eps_from_rdp_mironov2017(orders, rdp, delta):
    return np.asarray(rdp) + math.log(1 / delta) / (np.asarray(orders, dtype=float) - 1)


def eps_from_rdp_balle2020(orders, rdp, delta):
    """Balle et al. 2020, Thm. 21: smaller than Mironov's by log(a/(a-1)) + log(a)/(a-1)."""
    a = np.asarray(orders, dtype=float)
    return np.asarray(rdp) + np.log1p(-1 / a) - (math.log(delta) + np.log(a)) / (a - 1)


def get_privacy_spent(orders, rdp, delta):
    """(eps, best order): the smallest eps over the grid; warn if the best order is an edge."""
    check_inputs(delta=delta)
    orders = np.atleast_1d(np.asarray(orders, dtype=float))
    eps = np.maximum(eps_from_rdp_balle2020(orders, rdp, delta), 0.0)
    best = int(np.nanargmin(eps))
    if len(orders) > 1 and orders[best] in (orders.min(), orders.max()):
        warnings.warn(f"optimal RDP order {orders[best]:g} is at the edge of the order grid "
                      f"[{orders.min():g}, {orders.max():g}]: extend the grid, eps may be loose")
    return float(eps[best]), float(orders[best])


def epsilon_rdp(q, noise_multiplier, steps, delta, orders=DEFAULT_ORDERS):
    """eps at one noise multiplier, without edge warnings: the searches below try many."""
    with warnings.catch_warnings(action="ignore"):
        return get_privacy_spent(orders, compute_rdp(q, noise_multiplier, steps, orders), delta)[0]


# ------------------------------------------------------------------ 4. noise-multiplier calibration
def calibrate_noise(eps_of, target_epsilon, rtol, guess=1.0, factor=2.0):
    """Smallest noise multiplier s with eps_of(s) <= target, to rtol. The bracket keeps
    eps(lo) > target >= eps(hi) and we return hi, so the answer never overshoots the target.
    log eps is nearly linear in log s, so each trial is where the chord between the two
    ends crosses the target (regula falsi); halving the value kept at an end that stayed put
    twice (the Illinois rule) makes both ends converge, in far fewer evaluations than bisection."""
    f = lambda s: math.log(max(eps_of(s), 1e-300) / target_epsilon)  # > 0: too little noise
    hi, f_hi = guess, f(guess)
    while f_hi > 0:
        if hi > 1e6:
            raise ValueError(f"no noise multiplier <= 1e6 reaches eps={target_epsilon}: with "
                             "RDP, eps cannot fall below ~log(1/delta)/(max order - 1); add "
                             "larger orders")
        hi, f_hi = hi * factor, f(hi * factor)
    lo, f_lo = hi / factor, f(hi / factor)
    while f_lo <= 0:
        lo, hi, f_hi = lo / factor, lo, f_lo
        f_lo = f(lo)
    moved = 0  # +1: hi moved last, -1: lo moved last
    while hi / lo - 1 > rtol:
        t = (math.log(lo) * f_hi - math.log(hi) * f_lo) / (f_hi - f_lo)
        mid = min(max(math.exp(t), lo * (1 + rtol / 4)), hi / (1 + rtol / 4))  # strictly inside
        f_mid = f(mid)
        if f_mid <= 0:
            hi, f_hi, f_lo = mid, f_mid, f_lo / 2 if moved == 1 else f_lo
            moved = 1
        else:
            lo, f_lo, f_hi = mid, f_mid, f_hi / 2 if moved == -1 else f_hi
            moved = -1
    return hi


def get_noise_multiplier(target_epsilon, delta, sample_rate, steps, orders=DEFAULT_ORDERS,
                         rtol=1e-6):
    """The smallest noise multiplier (to rtol) whose RDP eps is <= target_epsilon."""
    check_inputs(q=sample_rate, delta=delta, epsilon=target_epsilon, steps=steps)
    if sample_rate == 0 or steps == 0:
        raise ValueError("with q = 0 or 0 steps nothing is released: any noise works")
    noise = calibrate_noise(lambda s: epsilon_rdp(sample_rate, s, steps, delta, orders),
                            target_epsilon, rtol)
    get_privacy_spent(orders, compute_rdp(sample_rate, noise, steps, orders), delta)  # edge?
    return noise


def noise_multiplier_within_tolerance(target_epsilon, delta, sample_rate, steps, orders):
    """The search common in libraries, for comparison: double the noise multiplier from 10 until
    eps < target, then bisect it from 0 until eps lies within 0.01 below the target."""
    eps = lambda s: epsilon_rdp(sample_rate, s, steps, delta, orders)
    lo, hi = 0.0, 10.0
    while (eps_hi := eps(hi)) > target_epsilon:
        hi *= 2
    while target_epsilon - eps_hi > 0.01:
        mid = (lo + hi) / 2
        if (eps_mid := eps(mid)) < target_epsilon:
            hi, eps_hi = mid, eps_mid
        else:
            lo = mid
    return hi


# ============================================================ Part 2: a tight accountant (PLD)
# Going further. RDP bounds eps through moments of the privacy loss and loses a little in the
# conversion; the privacy loss distribution itself gives the exact delta(eps) up to the grid.
def pld_one_step(q, noise_multiplier, h, remove):
    """Distribution of the privacy loss L = log(P/Q)(x), x ~ P, of one step, on the grid k*h.
    remove: P = mu (mixture), Q = mu0;  add: P = mu0, Q = mu. L is monotone in x, so the
    masses P(L >= l) and Q(L >= l) are Gaussian CDFs at x(l). Discretisation is pessimistic:
    the mass of each cell [l_k, l_k+1) is split between its two ends so that E_P[e^-L]
    (= the Q-mass) is kept; by convexity this can only raise every delta(eps) (a mean-preserving
    spread of e^-L, as in Doroshenko et al. 2022), and such dominance survives composition.
    Losses above the grid (x beyond 8 s) count as infinite, losses below it round up."""
    s, sign = noise_multiplier, 1.0 if remove else -1.0
    # L(x) = +-log((1-q) + q e^y), y = (2x-1)/(2 s^2), as a log-sum: it stays finite where
    # e^y underflows (log1p(q expm1(y)) would be log(0) at q = 1, the Gaussian mechanism)
    log_1mq = math.log1p(-q) if q < 1 else -math.inf
    loss_at = lambda x: sign * np.logaddexp(log_1mq, math.log(q) + (2 * x - 1) / (2 * s**2))
    ends = sorted([loss_at(-8 * s), loss_at(1 + 8 * s)])
    k0, k1 = math.floor(ends[0] / h), math.ceil(ends[1] / h)
    losses = np.arange(k0, k1 + 1) * h
    with np.errstate(divide="ignore"):  # x(l) = -inf where no x reaches the loss l
        x = s**2 * np.log(np.maximum(np.exp(sign * losses) - (1 - q), 0) / q) + 0.5
    # L >= l  <=>  x >= x(l) (remove) or x <= x(l) (add): that tail under mu0 and under mu
    cdf = lambda z: np.exp(log_normal_cdf(z))
    tail_mu0 = cdf(-sign * x / s)
    tail_mu = (1 - q) * tail_mu0 + q * cdf(sign * (1 - x) / s)
    surv_p, surv_q = (tail_mu, tail_mu0) if remove else (tail_mu0, tail_mu)
    p_cell, q_cell = -np.diff(surv_p), -np.diff(surv_q)
    to_right = np.clip((p_cell - q_cell * np.exp(losses[:-1])) / -np.expm1(-h), 0, p_cell)
    pmf = np.zeros(losses.size)
    pmf[:-1] += p_cell - to_right
    pmf[1:] += to_right
    pmf[0] += max(0.0, 1 - surv_p[0])  # P-mass below the grid, rounded up to its first point
    return k0, pmf, float(surv_p[-1])


def compose_pld(k0, pmf, steps, top, below):
    """T-fold convolution with one FFT: pmf^T in Fourier space. The FFT works modulo n, so we
    choose the window of sums it represents: from the cell `start` up to the cell `top` (beyond
    which the caller has bounded the mass). The sums below `start` have total mass <= `below`
    (Chernoff, see lower_window); they wrap onto the window, and the caller counts `below` in
    delta, so the result stays pessimistic however heavy the lower tail is."""
    start = lower_window(k0, pmf, steps, below)
    n = 4096 * math.ceil(max(top - steps * k0 - start, pmf.size) / 4096)  # 4096 k: a fast size
    composed = np.fft.irfft(np.fft.rfft(pmf, n) ** steps, n)
    composed = np.clip(np.roll(composed, -(start % n)), 0, None)  # sums start .. start + n - 1
    return steps * k0 + start + np.arange(n), composed


def lower_window(k0, pmf, steps, below):
    """Lowest sum of T cell indices worth representing. Chernoff: for any lam > 0,
    P(sum <= t) <= M(lam)^T e^(lam t), M(lam) = E[e^(-lam j)] of one step (exact, from the pmf),
    so every t <= (log below - T log M(lam)) / lam leaves mass <= `below` under it; we take the
    largest over a grid of lam around the Gaussian optimum, and never go below the minimum 0."""
    j = np.arange(pmf.size)
    mean = pmf @ j
    std = math.sqrt(max(pmf @ (j - mean) ** 2, 1e-12))
    lam = math.sqrt(2 * math.log(1 / below) / steps) / std * np.geomspace(0.01, 10, 121)
    with np.errstate(divide="ignore"):
        log_m = signed_logsumexp(np.log(pmf) - lam[:, None] * j, 1.0)
    t = (math.log(below) - steps * log_m) / lam
    return max(0, math.floor(np.max(t)))


def eps_from_pld(losses, pmf, delta):
    """Smallest eps >= 0 with delta(eps) = sum_k pmf_k (1 - e^(eps - l_k))+ <= delta.
    On [l_j, l_j+1] delta(eps) = S_P - e^eps S_Q with tail sums over l_k > l_j: solve exactly."""
    keep = losses >= 0  # for eps >= 0, cells with l_k <= 0 never count
    losses, pmf = losses[keep], pmf[keep]
    s_p = np.append(np.cumsum(pmf[::-1])[::-1][1:], 0.0)  # sums over k > j
    s_q = np.append(np.cumsum((pmf * np.exp(-losses))[::-1])[::-1][1:], 0.0)
    above = np.nonzero(s_p - np.exp(losses) * s_q > delta)[0]
    if above.size == 0:
        return 0.0
    j = above[-1]
    return float(math.log((s_p[j] - delta) / s_q[j]))


def pld_epsilon(q, noise_multiplier, steps, delta, h=None):
    """Tight eps of `steps` Poisson-subsampled Gaussian steps (worse of remove / add).
    Grid step h: by default 2% of the spread of one step's loss, q sqrt(e^(1/s^2) - 1),
    at most 1e-2. Each step's loss is rounded up by less than one cell, so eps exceeds the
    exact one by at most steps * h (plus the far tails, counted in delta) and is never below it."""
    check_inputs(q=q, noise_multiplier=noise_multiplier, delta=delta, steps=steps)
    if q == 0 or steps == 0:
        return 0.0
    s = noise_multiplier
    h = h or min(1e-2, 0.02 * q * math.sqrt(math.expm1(min(1 / s**2, 30))))
    # Mass above `top` is < 1e-6 delta by Chernoff: P(L >= t) <= E[e^((a-1)L)] e^(-(a-1)t), and
    # the moment is exp((a-1) RDP(a)) (remove bounds add, MTZ 2019), so t = Mironov's eps.
    unseen = 1e-6 * delta
    top = np.min(eps_from_rdp_mironov2017(DEFAULT_ORDERS, compute_rdp(q, s, steps), unseen))
    eps = 0.0
    for remove in (True, False):
        k0, pmf, p_inf = pld_one_step(q, s, h, remove)
        cells, composed = compose_pld(k0, pmf, steps, math.ceil(top / h), unseen)
        budget = delta - 2 * unseen + math.expm1(steps * math.log1p(-p_inf))  # minus P(any L = inf)
        if budget <= 0:
            return math.inf
        eps = max(eps, eps_from_pld(cells * h, composed, budget))
    return eps


def pld_noise_multiplier(target_epsilon, delta, sample_rate, steps, rtol=1e-4):
    """The smallest noise multiplier (to rtol) whose tight eps is <= target; starts from the
    RDP one, which is always enough (RDP is an upper bound), and brackets within a factor 1.25."""
    guess = get_noise_multiplier(target_epsilon, delta, sample_rate, steps, rtol=1e-3)
    return calibrate_noise(lambda s: pld_epsilon(sample_rate, s, steps, delta),
                           target_epsilon, rtol, guess, factor=1.25)


# ============================================================ Part 3: is it really private?
# An accountant proves an upper bound on eps; an audit attacks the mechanism and gets a lower
# bound. One run suffices (Steinke, Nasr, Jagielski 2023, "Privacy auditing with one (1)
# training run"): m canaries, each included with probability 1/2; guess "in" for the k
# highest scores and "out" for the k lowest (k fixed in advance: choosing it after looking
# at the scores would inflate the bound); v correct guesses out of r = 2k.
AUDIT_SETTINGS = [  # name, q, steps, claimed eps, delta, canaries m, other training examples
    ("DPDM MNIST eps=10", 1 / 15, 4500, 10.0, 1e-5, 1000, 60000),
    ("DPDM MNIST eps=10", 1 / 15, 4500, 10.0, 1e-5, 10000, 60000),
    ("DPDM MNIST eps=1", 1 / 15, 4500, 1.0, 1e-5, 1000, 60000),
    ("small: q=0.01", 0.01, 1000, 2.0, 1e-5, 1000, 1000),
    ("tiny data: q=1e-5", 1e-5, 10**7, 1.5, 1e-5, 500, 0),
]
BREAKAGES = ("noise/10", "no noise", "seed known", "realised |B|")


def binomial_tail(r, p):
    """P[Binomial(r, p) >= v] for v = 0 .. r + 1 (the pmf in log space, summed from the top)."""
    v = np.arange(r + 1)
    log_fact = np.concatenate([[0.0], np.cumsum(np.log(np.arange(1, r + 1)))])
    log_pmf = (log_fact[r] - log_fact[v] - log_fact[r - v]
               + v * math.log(p) + (r - v) * math.log1p(-p))
    return np.append(np.cumsum(np.exp(log_pmf)[::-1])[::-1], 0.0)


def audit_p_value(eps, m, r, v, delta):
    """How likely >= v of r guesses are right if the mechanism is (eps, delta)-DP (Steinke et
    al. 2023, their theorem for approximate DP): each guess is right w.p. <= p = e^eps/(1+e^eps),
    so with delta = 0 it is the Binomial(r, p) tail beta = P[>= v]; delta adds
    2 m delta max_i (P[>= v-i] - beta) / i."""
    tail = binomial_tail(r, 1 / (1 + math.exp(-eps)))
    i = np.arange(1, v + 1)
    return min(1.0, tail[v] + 2 * m * delta * np.max((tail[v - i] - tail[v]) / i, initial=0.0))


def eps_lower_bound(m, r, v, delta, significance=0.05):
    """The largest eps that v correct guesses refute at this significance (0 if none): if the
    mechanism were (eps, delta)-DP, seeing so many right guesses would have probability < 5%."""
    rejected = lambda eps: audit_p_value(eps, m, r, v, delta) <= significance
    if not rejected(0.0):
        return 0.0
    lo, hi = 0.0, 1.0
    while rejected(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1e-3:  # the p-value grows with eps: bisect
        lo, hi = ((lo + hi) / 2, hi) if rejected((lo + hi) / 2) else (lo, (lo + hi) / 2)
    return lo


def audit_one_run(scores, included, k, delta, rng, significance=0.05):
    """Guess "in" for the k top scores, "out" for the k bottom ones (ties broken at random)."""
    order = np.lexsort((rng.random(scores.size), scores))
    correct = included[order[-k:]].sum() + (~included[order[:k]]).sum()
    return eps_lower_bound(scores.size, 2 * k, int(correct), delta, significance)


def simulate_dirac_canaries(m, q, steps, noise_multiplier, rng, breakage=None):
    """Scores of m white-box "Dirac" canaries after `steps` DP-SGD steps, in units of C.
    Canary i's clipped gradient is C e_j(i), on a coordinate j(i) that nothing else touches, so
    coordinate j(i) of the released sum of noisy gradients is exactly
        C * Binomial(steps, q) * [i included] + N(0, steps s^2 C^2),
    independently over canaries: drawing these two numbers per canary IS the mechanism's
    distribution on the coordinates the audit reads (the other coordinates are independent of
    them). Dividing by qN and SGD's learning rate rescale every score alike. The score is that
    released coordinate; breakages: noise multiplier / 10, noise forgotten, or drawn from a seed
    that the adversary knows and replays (it subtracts the very same noise)."""
    included = rng.random(m) < 0.5
    counts = rng.binomial(steps, q, m) * included
    s = {"noise/10": noise_multiplier / 10, "no noise": 0.0}.get(breakage, noise_multiplier)
    noise = s * math.sqrt(steps) * rng.standard_normal(m)
    released = counts + noise
    if breakage == "seed known":  # replaying the seed reproduces this very noise
        released = released - noise
    return released, included


def simulate_realised_batch(m, q, steps, noise_multiplier, others, rng):
    """Broken: the noisy sum is divided by the realised batch size |B_t| instead of qN. The
    d >> m other coordinates are pure noise of spread s C / |B_t|, so a white-box adversary who
    sees every update knows |B_t| and multiplies it back: y = C b_t + N(0, s^2 C^2). It also
    knows that an included example was in the batch w.p. pi_t = |B_t| / (others + m/2), not q
    (examples are exchangeable): empty steps carry no signal, and with few examples pi_t >> q.
    Score: the log-likelihood ratio sum_t log(1 - pi_t + pi_t e^((2y - 1) / (2 s^2))), exact per
    step, so simulated step by step; without other examples only the non-empty steps."""
    included, s = rng.random(m) < 0.5, noise_multiplier
    scores, chunk = np.zeros(m), max(1, 2_000_000 // m)
    for sampled, size in sampled_canaries(included, q, steps, others, rng, chunk):
        y = sampled + s * rng.standard_normal(sampled.shape)
        pi = (size / (others + m / 2))[:, None]
        scores += np.log1p(pi * np.expm1((2 * y - 1) / (2 * s * s))).sum(0)
    return scores, included


def sampled_canaries(included, q, steps, others, rng, chunk):
    """Poisson sampling of the canaries, in chunks of steps: (sampled [n, m], |B_t| [n]) for the
    steps with |B_t| > 0. With no other examples, most steps are empty: draw how many are not,
    Binomial(steps, 1 - (1-q)^k) for k included canaries, and for each the first canary sampled
    (P(j) ~ (1-q)^j q, j < k) and the later ones as usual: the exact law given |B_t| > 0."""
    members, k = np.flatnonzero(included), np.count_nonzero(included)
    if others == 0:
        steps = rng.binomial(steps, -math.expm1(k * math.log1p(-q)))  # the non-empty ones
    for t in range(0, steps, chunk):
        n = min(chunk, steps - t)
        picked = rng.random((n, k)) < q
        if others == 0:
            u = rng.random(n) * -math.expm1(k * math.log1p(-q))
            first = np.minimum(np.floor(np.log1p(-u) / math.log1p(-q)), k - 1).astype(int)
            picked &= np.arange(k) > first[:, None]
            picked[np.arange(n), first] = True
        sampled = np.zeros((n, included.size), dtype=bool)
        sampled[:, members] = picked
        size = picked.sum(1) + rng.binomial(others, q, n)
        yield sampled[size > 0], size[size > 0]


def audit_setting(q, steps, eps, delta, m, others, rng):
    """Claimed eps (calibrated noise), the canary ceiling, and one run's eps_LB per mechanism."""
    noise_multiplier = get_noise_multiplier(eps, delta, q, steps)
    claimed = epsilon_rdp(q, noise_multiplier, steps, delta)
    lower = {}
    for breakage in (None,) + BREAKAGES:
        if breakage == "realised |B|":
            scores, included = simulate_realised_batch(m, q, steps, noise_multiplier, others, rng)
        else:
            scores, included = simulate_dirac_canaries(m, q, steps, noise_multiplier, rng, breakage)
        lower[breakage or "correct"] = audit_one_run(scores, included, m // 4, delta, rng)
    ceiling = eps_lower_bound(m, m, m, delta)
    ceiling_k = eps_lower_bound(m, m // 2, m // 2, delta)
    return dict(noise_multiplier=noise_multiplier, claimed=claimed, lower=lower, ceiling=ceiling,
                ceiling_k=ceiling_k)


def run_audit(out):
    """`--audit`: what m canaries can show at all, then the table and its figure."""
    print("Most eps that m canaries can show at 95% (all m guesses right):")
    for delta in (0.0, 1e-5):
        print(f"  delta = {delta:g}:  " + "  ".join(
            f"m = {m}: {eps_lower_bound(m, m, m, delta):.2f}" for m in (100, 1000, 5000, 10000)))
    print("One-run audit, k = m/4 guesses each way (ceiling: all m right / all 2k right).\n"
          "eps_LB of the correct mechanism, then of broken ones: noise multiplier / 10, no noise,\n"
          "noise seed known to the adversary, division by the realised batch size |B_t|.")
    print(f"{'setting':19s} {'m':>5s} {'noise':>7s} {'claimed':>7s} {'ceiling':>11s} | "
          f"{'correct':>7s} " + " ".join(f"{b:>12s}" for b in BREAKAGES))
    rng, rows = np.random.default_rng(), []
    for name, q, steps, eps, delta, m, others in AUDIT_SETTINGS:
        row = audit_setting(q, steps, eps, delta, m, others, rng)
        rows.append((name, row))
        print(f"{name:19s} {m:5d} {row['noise_multiplier']:7.3f} {row['claimed']:7.2f} "
              f"{row['ceiling']:5.2f}/{row['ceiling_k']:5.2f} | {row['lower']['correct']:7.2f} "
              + " ".join(f"{row['lower'][b]:12.2f}" for b in BREAKAGES), flush=True)
    plot_audit(pathlib.Path(out) / "audit.png", rows)


def plot_audit(path, rows):
    """eps_LB against the claimed eps: the correct mechanism must stay under the diagonal."""
    from matplotlib.figure import Figure  # no pyplot: nothing to show, nothing to close
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    claimed = np.array([row["claimed"] for _, row in rows])
    for i, (mechanism, marker) in enumerate(zip(("correct",) + BREAKAGES, "o^vsD")):
        lower = [row["lower"][mechanism] for _, row in rows]
        hollow = dict(facecolors="none", edgecolors="k") if mechanism == "correct" else {}
        ax.scatter(claimed * (1 + 0.04 * (i - 2)), lower, marker=marker, label=mechanism, **hollow)
    ax.scatter(claimed, [row["ceiling"] for _, row in rows], marker="_", s=300, color="gray",
               label="ceiling (m canaries)")
    grid = np.array([0.8, 12])
    ax.plot(grid, grid, color="gray", lw=0.8, ls=":", label="eps_LB = claimed eps")
    ax.set(xscale="log", xlabel="claimed eps (RDP accountant)", ylabel="audited eps lower bound",
           title="One-run audit: correct vs deliberately broken DP-SGD")
    ax.legend(fontsize=7)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


# ============================================================ DPDM's numbers, figure, command line
DPDM = {"MNIST / F-MNIST": dict(n=60000, batch_size=4096, epochs=300, delta=1e-5, eps=(10, 1, 0.2)),
        "CelebA 32": dict(n=162770, batch_size=2048, epochs=300, delta=1e-6, eps=(10, 1))}


def dpdm_sampling(n, batch_size, epochs):
    """Opacus' Poisson loader (used by DPDM) samples each example with q = 1/len(loader) =
    1/ceil(N/B), not B/N: MNIST gets q = 1/15 (expected batch 4000) and 15 steps per epoch."""
    steps_per_epoch = math.ceil(n / batch_size)
    return 1 / steps_per_epoch, round(epochs * steps_per_epoch)


def print_dpdm_table(tight):
    """Noise multipliers for DPDM's settings, with a legend: no column needs the source."""
    print("Noise multiplier for each DPDM setting (RDP, Balle et al. 2020 conversion). Columns:\n"
          "  lib     the usual search, stopped within 0.01 below the target eps (Opacus' orders)\n"
          "  opacus  exact search (to 1e-6) on Opacus' orders (<= 63)\n"
          "  ours    exact search on our orders (to 256); a = the best order; save = 1 - ours/lib"
          + ("\n  PLD     tight accountant (privacy loss distribution); save = 1 - PLD/ours"
             if tight else ""))
    print(f"{'setting':16s} {'q':>6s} {'steps':>6s} {'delta':>6s} {'eps':>4s} | {'lib':>8s} "
          f"{'opacus':>8s} {'ours':>8s} {'a':>4s} {'save':>5s}"
          + (f" | {'PLD':>8s} {'save':>5s}" if tight else ""))
    for name, cfg in DPDM.items():
        q, steps = dpdm_sampling(cfg["n"], cfg["batch_size"], cfg["epochs"])
        delta = cfg["delta"]
        for eps in cfg["eps"]:
            search = noise_multiplier_within_tolerance(eps, delta, q, steps, OPACUS_ORDERS)
            with warnings.catch_warnings(action="ignore"):  # eps=0.2 sits on the edge: shown
                grid63 = get_noise_multiplier(eps, delta, q, steps, OPACUS_ORDERS)
            exact = get_noise_multiplier(eps, delta, q, steps)
            order = get_privacy_spent(DEFAULT_ORDERS, compute_rdp(q, exact, steps), delta)[1]
            line = (f"{name:16s} 1/{round(1 / q):<4d} {steps:6d} {delta:6.0e} {eps:4g} | "
                    f"{search:8.4f} {grid63:8.4f} {exact:8.4f} {order:4g} "
                    f"{1 - exact / search:5.1%}")
            if tight:
                pld = pld_noise_multiplier(eps, delta, q, steps)
                line += f" | {pld:8.4f} {1 - pld / exact:5.1%}"
            print(line, flush=True)


def plot_eps_vs_epochs(path, noise_multipliers=(1.0, 2.5, 5.0, 18.0, 80.0), delta=1e-5):
    """DPDM MNIST (q = 1/15, 15 steps an epoch): RDP eps as lines, tight PLD eps as dots."""
    from matplotlib.figure import Figure
    epochs = np.unique(np.geomspace(1, 300, 60).round())
    fig = Figure(figsize=(6, 4), dpi=100)
    ax = fig.subplots()
    for noise in noise_multipliers:
        rdp_epoch = compute_rdp(1 / 15, noise, 15)
        with warnings.catch_warnings(action="ignore"):  # few epochs of much noise: order 256
            eps = [get_privacy_spent(DEFAULT_ORDERS, e * rdp_epoch, delta)[0] for e in epochs]
        line, = ax.plot(epochs, eps, label=f"noise multiplier = {noise:g}")
        tight = [pld_epsilon(1 / 15, noise, 15 * e, delta) for e in (3, 30, 300)]
        ax.plot([3, 30, 300], tight, "o", color=line.get_color(), ms=4)
    for eps in (10, 1, 0.2):
        ax.axhline(eps, color="gray", lw=0.6, ls=":")
    ax.set(xscale="log", yscale="log", xlabel="epochs (15 steps each, q = 1/15)",
           ylabel=f"epsilon at delta = {delta:g}",
           title="DPDM MNIST: eps vs epochs (lines RDP, dots tight PLD)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


def flag_value(convert, ok, need):
    """An argparse type: the text converted, or refused with what the flag needs (argparse
    puts the flag's name in front); nan fails every comparison, so `ok` refuses it too."""
    def parse(text):
        try:
            value = convert(text)
        except ValueError:
            value = None
        if value is None or not ok(value):
            raise argparse.ArgumentTypeError(f"got {text!r}; give {need}")
        return value
    return parse


POSITIVE = flag_value(float, lambda v: 0 < v < math.inf, "a finite number > 0")
COUNT = flag_value(int, lambda v: v >= 1, "a whole number >= 1")
RATE = flag_value(float, lambda v: 0 < v <= 1, "a sampling rate in (0, 1], e.g. 0.01")
DELTA = flag_value(float, lambda v: 0 < v < 1, "a probability in (0, 1) well below 1/N, e.g. 1e-5")


def build_parser():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0] + ". Without --noise-multiplier"
                                " or --target-epsilon: DPDM's noise multipliers and the figure.")
    p.error = lambda message: p.exit(  # one line that says what to do, not the usage block
        2, f"error: {message}. See: python {pathlib.Path(__file__).name} --help\n")
    question = p.add_mutually_exclusive_group()
    question.add_argument("--noise-multiplier", "--sigma", type=POSITIVE, dest="noise_multiplier",
                          help="print the eps of this noise multiplier, > 0 (default: none)")
    question.add_argument("--target-epsilon", type=POSITIVE,
                          help="print the least noise multiplier reaching it, > 0 (default: none)")
    p.add_argument("--q", type=RATE,
                   help="Poisson sampling rate in (0, 1] (default: DPDM's, 1/ceil(n/batch-size))")
    p.add_argument("--batch-size", type=COUNT, default=4096,
                   help="expected batch size, a whole number >= 1 (default: %(default)s)")
    p.add_argument("--n", type=COUNT, default=60000,
                   help="training-set size, a whole number >= 1 (default: %(default)s)")
    p.add_argument("--steps", type=COUNT,
                   help="DP-SGD steps, >= 1 (default: epochs/q with --q, else epochs*ceil(n/B))")
    p.add_argument("--epochs", type=POSITIVE, default=300,
                   help="epochs, a finite number > 0 (default: %(default)s)")
    p.add_argument("--delta", type=DELTA, default=1e-5,
                   help="delta, in (0, 1) and well below 1/n (default: %(default)g)")
    p.add_argument("--table", action="store_true",
                   help="only the table of DPDM's noise multipliers, no figure (default: off)")
    p.add_argument("--no-tight", action="store_true",
                   help="skip the tight (PLD) accountant (default: off, so it runs)")
    p.add_argument("--audit", action="store_true",
                   help="audit correct and broken DP-SGD; writes audit.png (default: off)")
    p.add_argument("--out", default="out/03_accountant",
                   help="folder for the figures, created if missing (default: %(default)s)")
    p.add_argument("--threads", type=COUNT, default=1,
                   help="torch threads, used for log Phi, >= 1 (default: %(default)s)")
    return p


def parse_args(argv=None):
    """The flags, every value checked (one line each) before anything runs."""
    p = build_parser()
    args = p.parse_args(argv)
    out = pathlib.Path(args.out)
    if any(path.exists() and not path.is_dir() for path in (out, *out.parents)):
        p.error(f"argument --out: {args.out} is a file or inside one; give a folder")
    if args.noise_multiplier is None and args.target_epsilon is None:
        return args
    if args.q is None and args.delta >= 1 / args.n:
        p.error(f"argument --delta: {args.delta:g} >= 1/N = {1 / args.n:.2g} (--n {args.n}); "
                "take delta well below 1/N")
    if query_sampling(args)[1] == 0:
        p.error(f"argument --epochs: {args.epochs:g} epochs make 0 steps; give more, or --steps")
    return args


def query_sampling(args):
    """(q, steps) of a command-line question: --q with --epochs, else DPDM's loader from --n
    and --batch-size; --steps, if given, sets the number of steps."""
    if args.q is not None:
        q, steps = args.q, round(args.epochs / args.q)
    else:
        q, steps = dpdm_sampling(args.n, args.batch_size, args.epochs)
    return q, args.steps or steps  # a given --steps is >= 1


def query(args):
    """One question from the command line: eps for a noise multiplier, or the reverse."""
    q, steps = query_sampling(args)
    print(f"q = {q:.6g}, steps = {steps}, delta = {args.delta:g}")
    if args.noise_multiplier is not None:
        rdp = compute_rdp(q, args.noise_multiplier, steps)
        eps, order = get_privacy_spent(DEFAULT_ORDERS, rdp, args.delta)
        mironov = np.min(eps_from_rdp_mironov2017(DEFAULT_ORDERS, rdp, args.delta))
        print(f"noise multiplier {args.noise_multiplier:g}: eps = {eps:.4f} (RDP, Balle 2020, "
              f"order {order:g}); with Mironov 2017's conversion {mironov:.4f}")
        if not args.no_tight:
            tight = pld_epsilon(q, args.noise_multiplier, steps, args.delta)
            print(f"tight (PLD) eps = {tight:.4f}")
    else:
        noise = get_noise_multiplier(args.target_epsilon, args.delta, q, steps)
        print(f"eps = {args.target_epsilon:g}: noise multiplier = {noise:.6f} (RDP, to 1e-6)")
        if not args.no_tight:
            pld = pld_noise_multiplier(args.target_epsilon, args.delta, q, steps)
            print(f"tight (PLD) noise multiplier = {pld:.4f}, {1 - pld / noise:.1%} less noise")


def main(argv=None):
    args = parse_args(argv)
    import torch
    torch.set_num_threads(args.threads)
    t0 = time.time()
    if args.noise_multiplier is not None or args.target_epsilon is not None:
        return query(args)
    if args.audit:
        run_audit(args.out)
    else:
        print_dpdm_table(tight=not args.no_tight)
        if not args.table:
            plot_eps_vs_epochs(pathlib.Path(args.out) / "eps_vs_epochs.png")
    print(f"done in {time.time() - t0:.1f} s")


if __name__ == "__main__":
    main()
