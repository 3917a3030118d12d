"""Thompson-sampling arm weights for experiments in bandit mode.

A fixed 50/50 split keeps sending half the traffic to a losing arm for the whole experiment. In bandit mode the
router instead moves traffic towards the arms that are probably best: on an interval it turns each arm's reward
totals into a posterior, estimates P(arm is best) from joint posterior draws, and uses those probabilities as the
new weights. Because the weights move, every assignment logs its *propensity* (its arm's weight at the time), so
analysis can reweight (IPW) and stay unbiased.

Model
-----
* ``BERNOULLI`` (rewards 0/1, e.g. converted or not): arm i's success rate ~ Beta(a + successes, b + failures)
  with ``prior = (a, b)`` (default the uniform Beta(1, 1)).
* ``GAUSSIAN`` (real-valued rewards, e.g. revenue): each arm's mean has the conjugate Normal-scaled-inverse-chi^2
  posterior, whose marginal for the mean is a Student-t. The prior is weak and centred on the data of all arms
  together: mean mu0 = the pooled mean, variance s0^2 = the pooled variance (1.0 when fewer than two rewards or
  no spread at all), and ``prior = (kappa0, nu0)`` says how many observations the prior mean and prior variance
  are worth (default one each). With n rewards, mean xbar and sum of squared deviations SS::

      kappa_n = kappa0 + n        mu_n = (kappa0 mu0 + n xbar) / kappa_n        nu_n = nu0 + n
      nu_n s_n^2 = nu0 s0^2 + SS + (n kappa0 / kappa_n) (xbar - mu0)^2
      mean | data ~ mu_n + sqrt(s_n^2 / kappa_n) * t(nu_n)

  so an arm with n < 2 rewards gets the wide prior (about the spread of single rewards), an arm with many rewards
  a posterior of about xbar +- s / sqrt(n), and an arm whose rewards are all equal still has spread (from s0^2).

Weights
-------
``P(best)`` is the share of ``samples`` joint draws (one per arm, all arms at once, vectorised) in which the arm
has the largest value. Weights are then floored at ``min_weight`` so that no arm stops being explored: arms below
the floor get exactly ``min_weight`` and the others share the rest in proportion to P(best), repeated until no arm
falls below (water-filling). This needs ``min_weight * n_arms <= 1``; the weights sum to 1 within 1e-12.

Inputs break their rule with a ValueError whose message is ``"<field>: <rule>"``.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum

import numpy as np

from guardmesh.stats import mean_var

#: Prior variance for Gaussian rewards when the data give none (fewer than 2 rewards, or all rewards equal).
FALLBACK_VARIANCE = 1.0


@dataclass(frozen=True)
class ArmRewards:
    """Count, sum and sum of squares of the rewards one arm received: all a posterior needs, and durable."""

    n: int
    total: float
    total_sq: float

    @staticmethod
    def of(values: np.ndarray) -> ArmRewards:
        """Totals of a 1-D array of finite rewards."""
        arr = np.asarray(values, dtype=np.float64)
        if arr.ndim != 1:
            raise ValueError(f"values: must be 1-D, got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError("values: rewards must be finite")
        return ArmRewards(int(arr.shape[0]), float(np.sum(arr)), float(np.dot(arr, arr)))

    @property
    def mean(self) -> float:
        """Mean reward (NaN with no rewards)."""
        return self.total / self.n if self.n > 0 else math.nan

    def validate(self, where: str) -> None:
        """n a non-negative integer; totals finite; total_sq >= 0; both totals 0 when n is 0."""
        if isinstance(self.n, bool) or not isinstance(self.n, int | np.integer):
            raise ValueError(f"{where}.n: must be an integer")
        if self.n < 0:
            raise ValueError(f"{where}.n: must be >= 0 (got {self.n})")
        for name, value in (("total", self.total), ("total_sq", self.total_sq)):
            if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
                raise ValueError(f"{where}.{name}: must be a real number")
            if not math.isfinite(value):
                raise ValueError(f"{where}.{name}: must be finite (got {value})")
        if self.total_sq < 0:
            raise ValueError(f"{where}.total_sq: a sum of squares must be >= 0 (got {self.total_sq})")
        if self.n == 0 and (self.total != 0 or self.total_sq != 0):
            raise ValueError(f"{where}.total: must be 0 when n is 0")


class RewardKind(StrEnum):
    """How rewards are distributed, which picks the posterior."""

    BERNOULLI = "bernoulli"
    GAUSSIAN = "gaussian"


@dataclass(frozen=True)
class BanditUpdate:
    """One Thompson-sampling update: the new weights and what they came from."""

    weights: tuple[float, ...]
    prob_best: tuple[float, ...]
    posterior_mean: tuple[float, ...]
    samples: int


def _reward_kind(kind: RewardKind | str) -> RewardKind:
    try:
        return RewardKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in RewardKind)
        raise ValueError(f"kind: unknown reward kind {kind!r} (one of {allowed})") from None


def _check_int(value: int, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise ValueError(f"{name}: must be an integer")
    if value < minimum:
        raise ValueError(f"{name}: must be >= {minimum} (got {value})")
    return int(value)


def _check_min_weight(min_weight: float, n_arms: int) -> float:
    if isinstance(min_weight, bool) or not isinstance(min_weight, int | float | np.integer | np.floating):
        raise ValueError("min_weight: must be a real number")
    if not (math.isfinite(min_weight) and min_weight >= 0):
        raise ValueError(f"min_weight: must be finite and >= 0 (got {min_weight})")
    if min_weight * n_arms > 1.0 + 1e-12:
        raise ValueError(f"min_weight: min_weight * n_arms must be <= 1 (got {min_weight} * {n_arms})")
    return float(min_weight)


def _check_prior(prior: tuple[float, float]) -> tuple[float, float]:
    if len(prior) != 2:
        raise ValueError("prior: must be a pair of numbers")
    a, b = (float(p) for p in prior)
    if not (math.isfinite(a) and math.isfinite(b) and a > 0 and b > 0):
        raise ValueError(f"prior: both values must be finite and > 0 (got {prior})")
    return a, b


def _check_rewards(rewards: Sequence[ArmRewards], kind: RewardKind) -> tuple[ArmRewards, ...]:
    out = tuple(rewards)
    for i, r in enumerate(out):
        if not isinstance(r, ArmRewards):
            raise ValueError(f"rewards[{i}]: must be an ArmRewards")
        r.validate(f"rewards[{i}]")
        if kind is RewardKind.BERNOULLI and not 0 <= r.total <= r.n:
            raise ValueError(f"rewards[{i}].total: bernoulli rewards are 0/1, so 0 <= total <= n (got {r.total})")
    return out


def floor_weights(prob: np.ndarray, min_weight: float) -> np.ndarray:
    """Floor ``prob`` (summing to 1) at ``min_weight`` and share the rest in proportion (water-filling)."""
    k = prob.shape[0]
    weights = np.empty(k, dtype=np.float64)
    floored = np.zeros(k, dtype=bool)
    for _ in range(k + 1):  # each pass floors at least one more arm or stops
        free = ~floored
        mass = 1.0 - min_weight * int(floored.sum())
        weights[floored] = min_weight
        if not free.any():
            break
        share = float(prob[free].sum())
        weights[free] = prob[free] / share * mass if share > 0 else mass / int(free.sum())
        below = free & (weights < min_weight)
        if not below.any():
            break
        floored |= below
    if floored.all():
        weights[:] = 1.0 / k
    # Exact sum: put the rounding residue on the largest weight, which is the furthest above the floor.
    top = int(np.argmax(weights))
    weights[top] += 1.0 - math.fsum(weights.tolist())
    return weights


def _posterior_draws(
    rewards: Sequence[ArmRewards], kind: RewardKind, samples: int, rng: np.random.Generator, prior: tuple[float, float]
) -> tuple[np.ndarray, np.ndarray]:
    """``(draws[samples, arms], posterior_mean[arms])``."""
    n = np.array([r.n for r in rewards], dtype=np.float64)
    total = np.array([r.total for r in rewards], dtype=np.float64)
    total_sq = np.array([r.total_sq for r in rewards], dtype=np.float64)
    k = n.shape[0]
    if kind is RewardKind.BERNOULLI:
        a = prior[0] + total
        b = prior[1] + (n - total)
        return rng.beta(a, b, size=(samples, k)), a / (a + b)

    kappa0, nu0 = prior
    n_all = float(n.sum())
    sum_all = float(total.sum())
    mu0 = sum_all / n_all if n_all > 0 else 0.0
    var0 = FALLBACK_VARIANCE
    if n_all >= 2:
        pooled = float(mean_var(n_all, sum_all, float(total_sq.sum()))[1])  # all rewards together
        if pooled > 0 and math.isfinite(pooled):
            var0 = pooled
    has = n > 0
    xbar = np.divide(total, n, out=np.full(k, mu0), where=has)
    ss = np.maximum(total_sq - np.divide(total * total, n, out=np.zeros(k), where=has), 0.0)
    kappa_n = kappa0 + n
    mu_n = (kappa0 * mu0 + n * xbar) / kappa_n
    nu_n = nu0 + n
    var_n = (nu0 * var0 + ss + (n * kappa0 / kappa_n) * (xbar - mu0) ** 2) / nu_n
    scale = np.sqrt(var_n / kappa_n)
    return mu_n + scale * rng.standard_t(nu_n, size=(samples, k)), mu_n


def thompson_weights(
    rewards: Sequence[ArmRewards],
    kind: RewardKind,
    *,
    min_weight: float = 0.01,
    samples: int = 10000,
    seed: int | np.random.Generator | None = None,
    prior: tuple[float, float] = (1.0, 1.0),
) -> BanditUpdate:
    """New arm weights by Thompson sampling: P(best) over ``samples`` joint posterior draws, floored at ``min_weight``.

    ``prior`` is (a, b) of the Beta prior for ``BERNOULLI`` and (kappa0, nu0), the pseudo-counts of the pooled
    mean and variance, for ``GAUSSIAN`` (see the module docstring). ``seed`` makes the draws reproducible.
    """
    kind = _reward_kind(kind)
    rewards = _check_rewards(rewards, kind)
    if len(rewards) < 2:
        raise ValueError(f"rewards: needs at least 2 arms (got {len(rewards)})")
    min_weight = _check_min_weight(min_weight, len(rewards))
    samples = _check_int(samples, "samples", 1)
    prior = _check_prior(prior)
    rng = np.random.default_rng(seed)

    draws, posterior_mean = _posterior_draws(rewards, kind, samples, rng, prior)
    best = np.argmax(draws, axis=1)
    prob_best = np.bincount(best, minlength=len(rewards)).astype(np.float64) / samples
    weights = floor_weights(prob_best, min_weight)
    return BanditUpdate(
        weights=tuple(float(w) for w in weights),
        prob_best=tuple(float(p) for p in prob_best),
        posterior_mean=tuple(float(m) for m in posterior_mean),
        samples=samples,
    )


class BanditPolicy:
    """Accumulates rewards per arm and decides when the weights are due for an update.

    Rewards accumulate for the whole experiment (an update does not reset them), so the totals are all that must
    be durable: ``snapshot`` them, and ``restore`` after a restart. All methods are thread-safe (one lock). The
    random stream comes from ``seed``; a restored policy starts a fresh stream from its seed, not a continuation.
    """

    def __init__(
        self,
        n_arms: int,
        kind: RewardKind,
        *,
        update_interval_s: float,
        min_weight: float = 0.01,
        min_rewards: int = 20,
        samples: int = 10000,
        seed: int | None = None,
    ) -> None:
        self._n_arms = _check_int(n_arms, "n_arms", 2)
        self._kind = _reward_kind(kind)
        if isinstance(update_interval_s, bool) or not isinstance(update_interval_s, int | float | np.floating):
            raise ValueError("update_interval_s: must be a real number")
        if not (math.isfinite(update_interval_s) and update_interval_s >= 0):
            raise ValueError(f"update_interval_s: must be finite and >= 0 (got {update_interval_s})")
        self._interval = float(update_interval_s)
        self._min_weight = _check_min_weight(min_weight, self._n_arms)
        self._min_rewards = _check_int(min_rewards, "min_rewards", 0)
        self._samples = _check_int(samples, "samples", 1)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._lock = threading.Lock()
        self._n = [0] * self._n_arms
        self._total = [0.0] * self._n_arms
        self._total_sq = [0.0] * self._n_arms
        self._last_update: float | None = None
        self._latest: BanditUpdate | None = None

    @property
    def n_arms(self) -> int:
        """Number of arms (arm 0 is control)."""
        return self._n_arms

    @property
    def kind(self) -> RewardKind:
        """Reward distribution."""
        return self._kind

    @property
    def last_update(self) -> float | None:
        """``now`` of the latest update (None: never updated)."""
        with self._lock:
            return self._last_update

    @property
    def latest(self) -> BanditUpdate | None:
        """The latest update computed by this instance (None after construction or restore)."""
        with self._lock:
            return self._latest

    def record(self, arm: int, reward: float) -> None:
        """Add one reward to ``arm``; a bernoulli reward must be 0 or 1, a gaussian one finite."""
        if isinstance(arm, bool) or not isinstance(arm, int | np.integer):
            raise ValueError("arm: must be an integer")
        if not 0 <= arm < self._n_arms:
            raise ValueError(f"arm: must be in [0, {self._n_arms}) (got {arm})")
        if not isinstance(reward, int | float | np.integer | np.floating):
            raise ValueError("reward: must be a real number")
        value = float(reward)
        if not math.isfinite(value):
            raise ValueError(f"reward: must be finite (got {reward})")
        if self._kind is RewardKind.BERNOULLI and value not in (0.0, 1.0):
            raise ValueError(f"reward: a bernoulli reward must be 0 or 1 (got {reward})")
        i = int(arm)
        with self._lock:
            self._n[i] += 1
            self._total[i] += value
            self._total_sq[i] += value * value

    def due(self, now: float) -> bool:
        """Whether to update at ``now``.

        True when ``update_interval_s`` has passed since the last update (always, before the first one) and
        every arm has received at least ``min_rewards`` rewards in total since the experiment started (rewards
        are cumulative: they are not counted per interval).
        """
        with self._lock:
            if self._last_update is not None and now - self._last_update < self._interval:
                return False
            return all(n >= self._min_rewards for n in self._n)

    def update(self, now: float) -> BanditUpdate:
        """Compute new weights from all rewards so far and remember ``now`` as the time of the update.

        Does not check ``due``: the caller decides when to update.
        """
        if not math.isfinite(now):
            raise ValueError(f"now: must be finite (got {now})")
        with self._lock:
            result = thompson_weights(
                self._snapshot_locked(),
                self._kind,
                min_weight=self._min_weight,
                samples=self._samples,
                seed=self._rng,
            )
            self._last_update = float(now)
            self._latest = result
            return result

    def snapshot(self) -> tuple[ArmRewards, ...]:
        """Per-arm reward totals, to persist."""
        with self._lock:
            return self._snapshot_locked()

    def _snapshot_locked(self) -> tuple[ArmRewards, ...]:
        return tuple(ArmRewards(n, t, q) for n, t, q in zip(self._n, self._total, self._total_sq, strict=True))

    @classmethod
    def restore(
        cls,
        n_arms: int,
        kind: RewardKind,
        *,
        rewards: Sequence[ArmRewards],
        last_update: float | None,
        update_interval_s: float,
        min_weight: float = 0.01,
        min_rewards: int = 20,
        samples: int = 10000,
        seed: int | None = None,
    ) -> BanditPolicy:
        """A policy rebuilt after a restart from durable per-arm totals and the time of the last update."""
        policy = cls(
            n_arms,
            kind,
            update_interval_s=update_interval_s,
            min_weight=min_weight,
            min_rewards=min_rewards,
            samples=samples,
            seed=seed,
        )
        rewards = _check_rewards(rewards, policy.kind)
        if len(rewards) != policy.n_arms:
            raise ValueError(f"rewards: {len(rewards)} arms for a policy with {policy.n_arms}")
        if last_update is not None and not math.isfinite(last_update):
            raise ValueError(f"last_update: must be finite or None (got {last_update})")
        policy._n = [int(r.n) for r in rewards]
        policy._total = [float(r.total) for r in rewards]
        policy._total_sq = [float(r.total_sq) for r in rewards]
        policy._last_update = None if last_update is None else float(last_update)
        return policy
