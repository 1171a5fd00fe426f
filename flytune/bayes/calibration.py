r"""On-the-fly calibration of the ensemble's uncertainty and the call decision.

Error model at a structure with ensemble energy mean Ê and total std σ (method §6):

    e = E_ref − Ê,   e | λ ~ N(μ, σ²/λ),   λ ~ Gamma(shape a, rate b),

μ the error expected there (0 unless a label's known residual is carried to the
structure, method §6). After n interventions with standardised errors
z_j = (e_j − μ_j) / σ_j the posterior of λ is Gamma(a', b') with a' = a + n/2,
b' = b + ½ Σ z_j², and the predictive error is a Student-t with ν = 2a' degrees of
freedom, location μ and scale s = σ·sqrt(b'/a'), so

    P(|e| < ε) = T_ν((ε − μ)/s) − T_ν((−ε − μ)/s)
               = 2ε·Γ(a'+½) / (Γ(a')·sqrt(2π b' σ²)) · ₂F₁(½, a'+½; 3/2; −ε²/(2 b' σ²))   (μ = 0).

With forgetting (discount γ < 1, see :class:`Calibrator`), the error seen k calls ago
counts with weight γ^k: a' = a + ½ Σ_j γ^{n−j}, b' = b + ½ Σ_j γ^{n−j} z_j².

The decision to call the reference (P(|e| > ε) > 1 − confidence, default 5 %) is made
by :class:`flytune.otf.decision.Decision`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Literal

import numpy as np
from scipy import optimize, special, stats

Form = Literal["t", "hyp2f1"]


def prob_within(threshold, sigma, shape, rate, form: Form = "t", mean=0.0):
    r"""P(|e| < ε) for a prediction with std σ and expected error μ (``mean``) under the
    Gamma(a', b') calibration.

    ``threshold`` ε, ``sigma`` σ and ``mean`` μ share one unit (e.g. eV); ``shape`` a' and
    ``rate`` b' are the calibration posterior's parameters. ``form="t"`` evaluates
    T_{2a'}((ε − μ)/s) − T_{2a'}((−ε − μ)/s), s = σ·sqrt(b'/a') (stable everywhere; used
    in the hot path); ``form="hyp2f1"`` (μ = 0 only) evaluates the closed form with
    Gauss's hypergeometric function, 2ε·Γ(a'+½)/(Γ(a')·sqrt(2π b' σ²))·₂F₁(½, a'+½;
    3/2; −ε²/(2b'σ²)), which is well-conditioned while ε²/(2b'σ²) is of order one or
    less. Broadcasts over arrays.
    """
    threshold, sigma, shape, rate, mean = np.broadcast_arrays(
        *(np.asarray(x, dtype=float) for x in (threshold, sigma, shape, rate, mean))
    )
    if form == "t":
        scale = sigma * np.sqrt(rate / shape)
        # 1 − P(e > ε) − P(e < −ε), each tail from the survival function (accurate far out)
        df = 2.0 * shape
        p = 1.0 - stats.t.sf((threshold - mean) / scale, df=df) - stats.t.sf((threshold + mean) / scale, df=df)
    elif form == "hyp2f1":
        if np.any(mean != 0):
            raise ValueError("form 'hyp2f1' is the closed form for mean 0; use form 't'")
        log_prefactor = (
            np.log(2.0 * threshold)
            + special.gammaln(shape + 0.5)
            - special.gammaln(shape)
            - 0.5 * np.log(2.0 * np.pi * rate * sigma**2)
        )
        x = -(threshold**2) / (2.0 * rate * sigma**2)
        p = np.exp(log_prefactor) * special.hyp2f1(0.5, shape + 0.5, 1.5, x)
    else:
        raise ValueError(f"form must be 't' or 'hyp2f1', not {form!r}")
    return p[()] if p.ndim == 0 else p


#: quantiles of the Gamma posterior that :func:`prob_force_within` averages over
FORCE_QUADRATURE_POINTS = 1000


def prob_force_within(threshold, sigma_atoms, shape, rate, points: int = FORCE_QUADRATURE_POINTS) -> float:
    r"""P(max over atoms of |ΔF_a| < ε_F) for predicted force errors of per-atom std
    ``sigma_atoms`` s_a (one unit with ``threshold`` ε_F, e.g. eV/Å), under the force
    calibration's Gamma(a', b') posterior on a precision multiplier λ shared by the atoms.

    Each atom's error vector is ΔF_a | λ ~ N(0, (s_a²/λ)·I₃), with s_a² the mean of the
    atom's three component variances (ensemble spread plus σ_F² of the likelihood head),
    so λ|ΔF_a|²/s_a² ~ χ²₃ and, the atoms independent given λ,

        P(max_a |ΔF_a| < ε_F) = ∫ Gamma(λ; a', b') · Π_a P(3/2, λ ε_F² / (2 s_a²)) dλ,

    P the regularised lower incomplete gamma function. The integral is the mean of the
    product over ``points`` midpoint quantiles of the Gamma posterior (error below
    1/points; the integrand is monotone in λ).
    """
    sigma = np.asarray(sigma_atoms, dtype=float).reshape(-1)
    if not (np.all(np.isfinite(sigma)) and np.all(sigma > 0)):
        raise ValueError("every per-atom force std must be finite and > 0")
    lam = stats.gamma.ppf((np.arange(points) + 0.5) / points, a=shape, scale=1.0 / rate)
    log_within = _log_gammainc_15(np.outer(lam, 0.5 * float(threshold) ** 2 / sigma**2)).sum(axis=1)
    return float(np.mean(np.exp(log_within)))


def force_z2(errors, variances) -> float:
    r"""The standardised squared force error of one labelled structure,

        u = (1/3A) Σ_{a,k} ΔF_{a,k}² / σ²_{a,k},

    which a force calibration observes as one z² per structure: the errors of the atoms
    of one structure come from one model error field and are far from independent, so
    counting its 3A components as 3A observations would make the calibration confident
    after a single call. E[u] = 1/λ as E[z²] = 1/λ, so b'/a' estimates the same factor.
    """
    errors, variances = np.asarray(errors, dtype=float), np.asarray(variances, dtype=float)
    if errors.shape != variances.shape or not np.all(variances > 0):
        raise ValueError("force errors and variances need one shape and variances > 0")
    return float(np.mean(errors**2 / variances))


def _log_gammainc_15(x):
    """ln P(3/2, x), accurate in both tails."""
    x = np.asarray(x, dtype=float)
    with np.errstate(divide="ignore"):
        return np.where(x < 1.5, np.log(special.gammainc(1.5, x)), np.log1p(-special.gammaincc(1.5, x)))


def typical_largest_error(sigma_atoms) -> float:
    r"""m̂, the median of the largest atom force error M = max_a |ΔF_a| when each atom's
    error is ΔF_a ~ N(0, s_a²·I₃), the atoms independent (one unit with ``sigma_atoms``
    s_a): the root of Π_a P(3/2, m̂²/(2s_a²)) = 1/2."""
    sigma = np.asarray(sigma_atoms, dtype=float).reshape(-1)
    if not (sigma.size and np.all(np.isfinite(sigma)) and np.all(sigma > 0)):
        raise ValueError("every per-atom force std must be finite and > 0")
    half = np.log(0.5)
    return float(optimize.brentq(lambda m: _log_gammainc_15(0.5 * m * m / sigma**2).sum() - half,
                                 1e-3 * sigma.min(), 100.0 * sigma.max(), xtol=1e-12 * sigma.max()))


#: τ₀, the prior scale of r = ln(M/m̂) in :class:`LargestAtomCalibrator` (a largest error
#: within a factor e^{±0.5} ≈ 1.6 of the predicted one)
LARGEST_ATOM_PRIOR_SCALE = 0.5


@dataclass
class LargestAtomCalibrator:
    r"""Force calibration of the statistic the force criterion thresholds: the largest
    atom force error of a structure, M = max_a |ΔF_a|.

    The component calibration (:class:`Calibrator` fed :func:`force_z2`) fits one factor
    on all predicted variances, ΔF_a ~ N(0, s_a²/λ·I₃), to the mean z² of each call. The
    largest of A such errors is then narrowly spread about its typical value. Where the
    error sits on a few atoms (a defect, an interface, a minority species) while the
    members agree everywhere, the mean z² stays ordinary and the predicted P(max_a
    |ΔF_a| > ε_F) stays small while the largest error passes ε_F; no single factor on
    the variances can give the largest error its real spread. Here the ratio of the
    largest error to the one predicted, r = ln(M/m̂) with m̂ the median of M under the
    per-atom model (:func:`typical_largest_error`), is calibrated directly: r ~ N(μ, τ²)
    with a Normal–Gamma prior, μ | τ² ~ N(μ₀, τ²/κ₀), τ⁻² ~ Gamma(α₀, β₀), so the
    calibration learns both how far the model's largest error is off (μ) and how widely
    it varies between structures (τ). With the data weighted by the forgetting of
    :class:`Calibrator` (discount γ; w = Σ_j γ^{n−j}, S₁ = Σ_j γ^{n−j} r_j,
    S₂ = Σ_j γ^{n−j} r_j²),

        κ' = κ₀ + w,   μ' = (κ₀μ₀ + S₁)/κ',   α' = α₀ + w/2,
        β' = β₀ + ½(S₂ + κ₀μ₀² − κ'μ'²),

    and the predictive of r is a Student-t with 2α' degrees of freedom, location μ' and
    scale sqrt(β'(κ' + 1)/(α'κ')), so

        P(max_a |ΔF_a| > ε_F) = 1 − T_{2α'}((ln(ε_F/m̂) − μ')/scale).

    Prior: α₀ = ``shape`` a and μ₀ = ½·ln(b/a) from the energy calibration's prior
    (``rate`` b: the same deliberate underconfidence, σ·sqrt(b/a)), κ₀ = 1, and
    β₀ = α₀·τ₀² (:data:`LARGEST_ATOM_PRIOR_SCALE`). ``n`` counts the structures seen.
    """

    shape: float = 3.0
    rate: float = 10.0
    discount: float = 1.0
    n: int = 0
    weight: float = 0.0
    sum_r: float = 0.0
    sum_r2: float = 0.0

    def __post_init__(self) -> None:
        Calibrator(self.shape, self.rate, discount=self.discount)  # the same checks

    def observe_forces(self, errors, variances) -> None:
        """Record the force errors ΔF (A, 3) of a labelled structure and the force variances
        (A, 3) predicted there before the update (s_a² the mean over an atom's components)."""
        errors, variances = np.asarray(errors, dtype=float), np.asarray(variances, dtype=float)
        if errors.shape != variances.shape or errors.ndim != 2 or not np.all(variances > 0):
            raise ValueError("force errors and variances need one shape (atoms, 3) and variances > 0")
        largest = max(float(np.linalg.norm(errors, axis=1).max()), 1e-12)
        self.observe_ratio(np.log(largest / typical_largest_error(np.sqrt(variances.mean(axis=1)))))

    def observe_ratio(self, r: float) -> None:
        """Record one r = ln(M/m̂)."""
        if not np.isfinite(r):
            raise ValueError(f"need a finite ln(M/m̂), got {r}")
        self.n += 1
        self.weight = self.discount * self.weight + 1.0
        self.sum_r = self.discount * self.sum_r + float(r)
        self.sum_r2 = self.discount * self.sum_r2 + float(r) ** 2

    def posterior(self) -> tuple[float, float, float, float]:
        """(μ', κ', α', β') of the Normal–Gamma posterior of (μ, τ⁻²)."""
        mu0, kappa0 = 0.5 * np.log(self.rate / self.shape), 1.0
        alpha0, beta0 = self.shape, self.shape * LARGEST_ATOM_PRIOR_SCALE**2
        kappa = kappa0 + self.weight
        mu = (kappa0 * mu0 + self.sum_r) / kappa
        beta = beta0 + 0.5 * (self.sum_r2 + kappa0 * mu0**2 - kappa * mu**2)
        return float(mu), float(kappa), alpha0 + 0.5 * self.weight, float(beta)

    def prob_force_exceed(self, threshold: float, sigma_atoms) -> float:
        """P(max_a |ΔF_a| > ε_F) for per-atom force stds ``sigma_atoms`` (one unit with ε_F)."""
        mu, kappa, alpha, beta = self.posterior()
        scale = np.sqrt(beta * (kappa + 1.0) / (alpha * kappa))
        r = np.log(float(threshold) / typical_largest_error(sigma_atoms))
        return float(stats.t.sf((r - mu) / scale, df=2.0 * alpha))

    def summary(self) -> dict:
        mu, kappa, alpha, beta = self.posterior()
        return {"kind": "largest_atom", "n": self.n, "log_ratio_mean": mu,
                "log_ratio_scale": float(np.sqrt(beta / alpha))}

    def state_dict(self) -> dict:
        return {"kind": "largest_atom", **asdict(self)}

    @classmethod
    def from_state_dict(cls, state: dict) -> LargestAtomCalibrator:
        return cls(**{k: v for k, v in state.items() if k != "kind"})


def predictive_scale(sigma, shape, rate):
    """Scale s = σ·sqrt(b'/a') of the Student-t predictive error (the calibrated σ)."""
    return np.asarray(sigma, dtype=float) * np.sqrt(rate / shape)


@dataclass
class Calibrator:
    r"""Gamma-prior calibration of the precision multiplier λ, updated by observed errors.

    ``shape`` and ``rate`` are the prior (a, b) (method defaults: a = 3, b = 10 for
    NequIP-type backbones, a = 1.5, b = 10 for MACE). A prior mean a/b < 1 makes the
    model deliberately underconfident at the start, so a miscalibration cannot stop the
    reference calls for good.

    ``discount`` γ ∈ (0, 1] forgets errors made by a model the run no longer has. The
    posterior is a power prior over the run's history: the likelihood of the error seen
    k calls ago enters raised to γ^k,

        a' = a + ½·w,   w = Σ_j γ^{n−j},          b' = b + ½·S,   S = Σ_j γ^{n−j} z_j²,

    updated recursively (w ← γ·w + 1, S ← γ·S + z²). The prior (a, b) itself is never
    discounted, so the rule cannot become more confident than the prior allows from
    little data; the data weigh at most 1/(1 − γ) calls (w → 1/(1 − γ)), and b'/a'
    follows the recent mean of z². Errors made before the posterior had learned (far
    above their σ) thus leave b' after a few memory lengths instead of never. γ = 1 (the
    default) is the paper's rule, a' = a + n/2, b' = b + ½ Σ z_j².

    ``n`` counts the errors seen (undiscounted; the calibration checks use it), ``weight``
    is w and ``sum_z2`` is S.
    """

    shape: float = 3.0
    rate: float = 10.0
    n: int = 0
    sum_z2: float = 0.0
    discount: float = 1.0
    weight: float | None = None  # None: n (a state written before forgetting existed)

    def __post_init__(self) -> None:
        if not (self.shape > 0 and self.rate > 0):
            raise ValueError(
                f"calibration prior needs shape > 0 and rate > 0, got shape={self.shape}, rate={self.rate}"
            )
        if not 0 < self.discount <= 1:
            raise ValueError(f"calibration discount must be in (0, 1], got {self.discount}")
        if self.weight is None:
            self.weight = float(self.n)

    @property
    def posterior_shape(self) -> float:
        """a' = a + w/2 (w = n without forgetting)."""
        return self.shape + 0.5 * self.weight

    @property
    def posterior_rate(self) -> float:
        """b' = b + S/2 (S = Σ z_j² without forgetting)."""
        return self.rate + 0.5 * self.sum_z2

    def observe(self, error: float, sigma: float, mean: float = 0.0) -> None:
        """Record one intervention: error e = E_ref − Ê, and the std σ and expected error μ
        predicted before the update (z = (e − μ)/σ)."""
        if not (np.isfinite(error) and np.isfinite(sigma) and sigma > 0 and np.isfinite(mean)):
            raise ValueError(f"need a finite error and mean and sigma > 0, got error={error}, sigma={sigma}, mean={mean}")
        self.observe_z2(float((error - mean) / sigma) ** 2)

    def observe_forces(self, errors, variances) -> None:
        """Record the force errors ΔF of a labelled structure and the force variances
        predicted there before the update, as one z² (:func:`force_z2`)."""
        self.observe_z2(force_z2(errors, variances))

    def observe_z2(self, z2: float) -> None:
        """Record one standardised squared error z² (e.g. :func:`force_z2` of a structure)."""
        if not (np.isfinite(z2) and z2 >= 0):
            raise ValueError(f"need a finite z² >= 0, got {z2}")
        self.n += 1
        self.weight = self.discount * self.weight + 1.0
        self.sum_z2 = self.discount * self.sum_z2 + float(z2)

    def prob_within(self, threshold: float, sigma, form: Form = "t", mean=0.0):
        """P(|e| < ε) for predictions with std ``sigma`` and expected error ``mean``."""
        return prob_within(threshold, sigma, self.posterior_shape, self.posterior_rate, form, mean)

    def prob_exceed(self, threshold: float, sigma, mean=0.0):
        """P(|e| > ε) = 1 − P(|e| < ε)."""
        return 1.0 - self.prob_within(threshold, sigma, mean=mean)

    def prob_force_exceed(self, threshold: float, sigma_atoms) -> float:
        """P(max_a |ΔF_a| > ε_F) for per-atom force stds ``sigma_atoms`` (:func:`prob_force_within`)."""
        return 1.0 - prob_force_within(threshold, sigma_atoms, self.posterior_shape, self.posterior_rate)

    def calibrated_sigma(self, sigma):
        """Scale of the predictive error, σ·sqrt(b'/a')."""
        return predictive_scale(sigma, self.posterior_shape, self.posterior_rate)

    def switch_sigma(self, threshold: float, confidence: float = 0.95) -> float:
        """The σ at which P(|e| < ε) equals ``confidence``: larger σ triggers a call."""
        t_quantile = stats.t.ppf(0.5 * (1.0 + confidence), df=2.0 * self.posterior_shape)
        return float(threshold / (t_quantile * np.sqrt(self.posterior_rate / self.posterior_shape)))

    def summary(self) -> dict:
        return {"shape": self.posterior_shape, "rate": self.posterior_rate, "n": self.n}

    def state_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_state_dict(cls, state: dict) -> Calibrator:
        return cls(**state)


#: force calibrations by their ``[uncertainty] force_calibration`` name
FORCE_CALIBRATIONS = {"components": Calibrator, "largest_atom": LargestAtomCalibrator}


def force_calibration_kind(state: dict) -> str:
    """The ``force_calibration`` name of a force calibration's state dict."""
    return state.get("kind", "components")
