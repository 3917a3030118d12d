"""abrouter policies without gRPC: Thompson-sampling bandit weights (guardrails: test_abrouter_guardrails.py)."""

from __future__ import annotations

import math
import threading

import numpy as np
import pytest

from services.abrouter.bandit import (
    ArmRewards,
    BanditPolicy,
    RewardKind,
    floor_weights,
    thompson_weights,
)

# ---------------------------------------------------------------------------------------------- bandit


def simulate(
    policy: BanditPolicy, draw_reward, *, rounds: int, per_round: int, rng: np.random.Generator
) -> list[tuple[float, ...]]:
    """Route ``per_round`` units by the current weights, record their rewards, update; the weights after each."""
    weights = np.full(policy.n_arms, 1.0 / policy.n_arms)
    history = []
    now = 0.0
    for _ in range(rounds):
        arms = rng.choice(policy.n_arms, size=per_round, p=weights)
        rewards = draw_reward(arms)
        for arm, reward in zip(arms.tolist(), rewards.tolist(), strict=True):
            policy.record(arm, reward)
        now += 60.0
        assert policy.due(now)
        update = policy.update(now)
        weights = np.asarray(update.weights)
        history.append(update.weights)
    return history


def check_weights(weights: tuple[float, ...], min_weight: float) -> None:
    assert abs(math.fsum(weights) - 1.0) <= 1e-12
    assert min(weights) >= min_weight - 1e-15


def test_bernoulli_converges_on_the_better_arm_and_keeps_the_floor() -> None:
    rates = np.array([0.10, 0.10, 0.20])
    rng = np.random.default_rng(7)
    policy = BanditPolicy(3, RewardKind.BERNOULLI, update_interval_s=60, min_weight=0.02, min_rewards=0, seed=1)
    history = simulate(
        policy, lambda arms: (rng.random(arms.shape[0]) < rates[arms]).astype(float), rounds=8, per_round=600, rng=rng
    )
    for w in history:
        check_weights(w, 0.02)
    assert history[-1][2] > 0.9
    assert history[-1][0] >= 0.02 and history[-1][1] >= 0.02
    assert policy.latest is not None and policy.latest.weights == history[-1]
    # The better arm's posterior mean is near its rate.
    assert abs(policy.latest.posterior_mean[2] - 0.20) < 0.03


def test_gaussian_converges_on_the_better_arm() -> None:
    means = np.array([1.0, 1.3])
    rng = np.random.default_rng(11)
    policy = BanditPolicy(2, RewardKind.GAUSSIAN, update_interval_s=60, min_weight=0.05, min_rewards=0, seed=2)
    history = simulate(policy, lambda arms: rng.normal(means[arms], 1.0), rounds=8, per_round=400, rng=rng)
    for w in history:
        check_weights(w, 0.05)
    assert history[-1][1] > 0.9
    assert history[-1][0] >= 0.05
    assert policy.latest is not None
    assert abs(policy.latest.posterior_mean[1] - 1.3) < 0.1


def test_equal_arms_stay_near_equal() -> None:
    equal = [ArmRewards(5000, 500.0, 500.0)] * 4
    update = thompson_weights(equal, RewardKind.BERNOULLI, seed=3)
    check_weights(update.weights, 0.01)
    assert max(abs(w - 0.25) for w in update.weights) < 0.03
    values = np.random.default_rng(4).normal(10.0, 2.0, size=(3, 4000))
    # Same data in every arm: exactly equal posteriors.
    same = [ArmRewards.of(values[0])] * 3
    update = thompson_weights(same, RewardKind.GAUSSIAN, seed=5)
    assert max(abs(w - 1 / 3) for w in update.weights) < 0.03


def test_clear_winner_is_floored_not_starved() -> None:
    rewards = [ArmRewards(1000, 10.0, 10.0), ArmRewards(1000, 500.0, 500.0), ArmRewards(1000, 20.0, 20.0)]
    update = thompson_weights(rewards, RewardKind.BERNOULLI, min_weight=0.05, seed=0)
    assert update.prob_best == (0.0, 1.0, 0.0)
    assert update.weights[0] == 0.05 and update.weights[2] == 0.05
    assert update.weights[1] == pytest.approx(0.9, abs=1e-12)
    check_weights(update.weights, 0.05)
    assert update.samples == 10000


def test_floor_is_water_filled() -> None:
    w = floor_weights(np.array([0.5, 0.495, 0.005]), 0.1)
    assert w[2] == 0.1
    assert w[0] / w[1] == pytest.approx(0.5 / 0.495)
    assert math.fsum(w.tolist()) == pytest.approx(1.0, abs=1e-12)
    assert floor_weights(np.array([1.0, 0.0, 0.0, 0.0]), 0.25).tolist() == [0.25] * 4


def test_weights_sum_to_one_on_random_inputs() -> None:
    rng = np.random.default_rng(9)
    for _ in range(20):
        k = int(rng.integers(2, 7))
        n = rng.integers(0, 200, size=k)
        succ = rng.binomial(n, rng.random(k))
        rewards = [ArmRewards(int(a), float(s), float(s)) for a, s in zip(n, succ, strict=True)]
        min_weight = float(rng.uniform(0, 1 / k))
        update = thompson_weights(rewards, RewardKind.BERNOULLI, min_weight=min_weight, samples=2000, seed=rng)
        check_weights(update.weights, min_weight)
        assert math.fsum(update.prob_best) == pytest.approx(1.0)


def test_seeded_determinism() -> None:
    rewards = [ArmRewards.of(np.array([1.0, 2.0, 3.0])), ArmRewards.of(np.array([2.0, 2.5, 3.5, 1.0]))]
    a = thompson_weights(rewards, RewardKind.GAUSSIAN, seed=42, samples=5000)
    b = thompson_weights(rewards, RewardKind.GAUSSIAN, seed=42, samples=5000)
    c = thompson_weights(rewards, RewardKind.GAUSSIAN, seed=43, samples=5000)
    assert a == b
    assert a.prob_best != c.prob_best

    def run(seed: int) -> list[tuple[float, ...]]:
        policy = BanditPolicy(2, RewardKind.BERNOULLI, update_interval_s=1, min_rewards=0, seed=seed)
        for i in range(30):
            policy.record(i % 2, float(i % 3 == 0))
        return [policy.update(1.0).weights, policy.update(2.0).weights]

    assert run(5) == run(5)


def test_gaussian_zero_variance_and_empty_arms() -> None:
    const = [ArmRewards.of(np.full(50, 5.0)), ArmRewards.of(np.full(50, 6.0))]
    update = thompson_weights(const, RewardKind.GAUSSIAN, seed=1)
    assert update.weights[1] > 0.9
    empty = [ArmRewards(0, 0.0, 0.0)] * 3
    update = thompson_weights(empty, RewardKind.GAUSSIAN, seed=1)
    check_weights(update.weights, 0.01)
    assert all(math.isfinite(w) for w in update.weights)
    assert max(abs(w - 1 / 3) for w in update.weights) < 0.03
    # One reward in an arm: the wide prior, not a point mass.
    one = [ArmRewards.of(np.array([100.0])), ArmRewards.of(np.random.default_rng(2).normal(0, 1, 500))]
    update = thompson_weights(one, RewardKind.GAUSSIAN, seed=1)
    assert 0.2 < update.weights[0] < 1.0


def test_due_respects_interval_and_min_rewards() -> None:
    policy = BanditPolicy(2, RewardKind.BERNOULLI, update_interval_s=30, min_rewards=3, seed=0)
    assert not policy.due(100.0)  # no rewards yet
    for _ in range(3):
        policy.record(0, 1)
    for _ in range(2):
        policy.record(1, 0)
    assert not policy.due(100.0)  # arm 1 has only 2
    policy.record(1, 1)
    assert policy.due(100.0)  # never updated: only min_rewards counts
    policy.update(100.0)
    assert policy.last_update == 100.0
    assert not policy.due(100.0)
    assert not policy.due(129.9)
    assert policy.due(130.0)  # rewards are cumulative: no new rewards needed
    assert not policy.due(50.0)  # clock behind the last update


def test_snapshot_and_restore() -> None:
    policy = BanditPolicy(3, RewardKind.GAUSSIAN, update_interval_s=10, min_rewards=2, seed=0)
    rng = np.random.default_rng(1)
    for arm, reward in zip(rng.integers(0, 3, 100).tolist(), rng.normal(0, 1, 100).tolist(), strict=True):
        policy.record(arm, reward)
    policy.update(50.0)
    snap = policy.snapshot()
    assert sum(r.n for r in snap) == 100
    restored = BanditPolicy.restore(
        3, RewardKind.GAUSSIAN, rewards=snap, last_update=50.0, update_interval_s=10, min_rewards=2, seed=0
    )
    assert restored.snapshot() == snap
    assert restored.last_update == 50.0
    assert not restored.due(55.0) and restored.due(60.0)
    restored.record(0, 1.5)
    assert restored.snapshot()[0] == ArmRewards(snap[0].n + 1, snap[0].total + 1.5, snap[0].total_sq + 2.25)
    # The restored totals give the same posterior as the original ones.
    a = thompson_weights(snap, RewardKind.GAUSSIAN, seed=8)
    assert (
        thompson_weights(
            BanditPolicy.restore(
                3, RewardKind.GAUSSIAN, rewards=snap, last_update=None, update_interval_s=10
            ).snapshot(),
            RewardKind.GAUSSIAN,
            seed=8,
        )
        == a
    )


def test_record_is_thread_safe() -> None:
    policy = BanditPolicy(2, RewardKind.BERNOULLI, update_interval_s=1, min_rewards=0, samples=500, seed=0)

    def worker(arm: int) -> None:
        for _ in range(2000):
            policy.record(arm, 1)

    threads = [threading.Thread(target=worker, args=(i % 2,)) for i in range(8)]
    for t in threads:
        t.start()
    for i in range(20):
        policy.update(float(i))
    for t in threads:
        t.join()
    assert [r.n for r in policy.snapshot()] == [8000, 8000]
    assert [r.total for r in policy.snapshot()] == [8000.0, 8000.0]


def test_arm_rewards_of() -> None:
    r = ArmRewards.of(np.array([1.0, 2.0, 3.0]))
    assert r == ArmRewards(3, 6.0, 14.0)
    assert r.mean == 2.0
    assert math.isnan(ArmRewards.of(np.array([])).mean)
    with pytest.raises(ValueError, match=r"^values: .*finite"):
        ArmRewards.of(np.array([1.0, np.nan]))
    with pytest.raises(ValueError, match=r"^values: .*1-D"):
        ArmRewards.of(np.ones((2, 2)))


GOOD = ArmRewards(10, 3.0, 3.0)


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"rewards": [GOOD]}, r"rewards: needs at least 2 arms"),
        ({"rewards": [GOOD, ArmRewards(-1, 0.0, 0.0)]}, r"rewards\[1\]\.n: must be >= 0"),
        ({"rewards": [GOOD, ArmRewards(5, math.nan, 1.0)]}, r"rewards\[1\]\.total: must be finite"),
        ({"rewards": [ArmRewards(5, 1.0, math.inf), GOOD]}, r"rewards\[0\]\.total_sq: must be finite"),
        ({"rewards": [GOOD, ArmRewards(5, 6.0, 6.0)]}, r"rewards\[1\]\.total: bernoulli.*total <= n"),
        ({"rewards": [GOOD, ArmRewards(5, -1.0, 1.0)]}, r"rewards\[1\]\.total: bernoulli"),
        ({"rewards": [GOOD, ArmRewards(0, 1.0, 1.0)]}, r"rewards\[1\]\.total: must be 0 when n is 0"),
        ({"kind": "poisson"}, r"kind: unknown reward kind"),
        ({"min_weight": 0.6}, r"min_weight: min_weight \* n_arms must be <= 1"),
        ({"min_weight": -0.1}, r"min_weight: must be finite and >= 0"),
        ({"samples": 0}, r"samples: must be >= 1"),
        ({"prior": (0.0, 1.0)}, r"prior: both values must be finite and > 0"),
    ],
)
def test_thompson_bad_input(kwargs: dict, field: str) -> None:
    args = {"rewards": [GOOD, GOOD], "kind": RewardKind.BERNOULLI, **kwargs}
    rewards, kind = args.pop("rewards"), args.pop("kind")
    with pytest.raises(ValueError, match=f"^{field}"):
        thompson_weights(rewards, kind, **args)


def test_thompson_accepts_kind_by_value() -> None:
    assert thompson_weights([GOOD, GOOD], "gaussian", seed=0).samples == 10000  # type: ignore[arg-type]


def test_policy_bad_input() -> None:
    with pytest.raises(ValueError, match=r"^n_arms: must be >= 2"):
        BanditPolicy(1, RewardKind.BERNOULLI, update_interval_s=1)
    with pytest.raises(ValueError, match=r"^kind: unknown"):
        BanditPolicy(2, "thompson", update_interval_s=1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^update_interval_s: must be finite and >= 0"):
        BanditPolicy(2, RewardKind.BERNOULLI, update_interval_s=-1)
    with pytest.raises(ValueError, match=r"^min_weight: "):
        BanditPolicy(4, RewardKind.BERNOULLI, update_interval_s=1, min_weight=0.3)
    with pytest.raises(ValueError, match=r"^min_rewards: must be >= 0"):
        BanditPolicy(2, RewardKind.BERNOULLI, update_interval_s=1, min_rewards=-1)
    policy = BanditPolicy(2, RewardKind.BERNOULLI, update_interval_s=1)
    with pytest.raises(ValueError, match=r"^arm: must be in \[0, 2\)"):
        policy.record(2, 1)
    with pytest.raises(ValueError, match=r"^arm: must be an integer"):
        policy.record(True, 1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"^reward: a bernoulli reward must be 0 or 1"):
        policy.record(0, 0.5)
    gaussian = BanditPolicy(2, RewardKind.GAUSSIAN, update_interval_s=1)
    with pytest.raises(ValueError, match=r"^reward: must be finite"):
        gaussian.record(0, math.nan)
    assert gaussian.snapshot() == (ArmRewards(0, 0.0, 0.0), ArmRewards(0, 0.0, 0.0))
    with pytest.raises(ValueError, match=r"^rewards: 1 arms for a policy with 2"):
        BanditPolicy.restore(2, RewardKind.GAUSSIAN, rewards=[GOOD], last_update=0.0, update_interval_s=1)
    with pytest.raises(ValueError, match=r"^rewards\[1\]\.total: bernoulli"):
        BanditPolicy.restore(
            2, RewardKind.BERNOULLI, rewards=[GOOD, ArmRewards(2, 3.0, 3.0)], last_update=0.0, update_interval_s=1
        )
    with pytest.raises(ValueError, match=r"^last_update: must be finite"):
        BanditPolicy.restore(2, RewardKind.GAUSSIAN, rewards=[GOOD, GOOD], last_update=math.nan, update_interval_s=1)
