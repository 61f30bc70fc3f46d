"""τ calibrated to a false-positive rate: exact quantile rule, one yardstick, clear refusals."""

import numpy as np
import pytest
from scipy.ndimage import uniform_filter
from sklearn.datasets import load_digits

from diffcurate.metrics.mem_calibration import (
    calibrate_threshold,
    closest_values,
    false_positives,
)
from diffcurate.metrics.memorization import (
    MemorizationPolicy,
    mem_percent,
    relative_distances,
    tiled_l2_distances,
)

TILED = MemorizationPolicy()
COSINE = MemorizationPolicy(metric="clip_cosine")


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().images[..., None] / 16.0  # [1797, 8, 8, 1] in [0, 1]


def test_closest_values_are_the_column_minima_of_the_distance_matrix(digits):
    gens, images = digits[:40], digits[100:160]
    np.testing.assert_array_equal(
        closest_values(gens, images, TILED), tiled_l2_distances(gens, images).min(axis=0)
    )


@pytest.mark.parametrize("fpr", [0.01, 0.05, 0.1, 0.5])
def test_tau_admits_exactly_floor_fpr_n_false_positives(digits, fpr):
    # Digits have 17 grey levels, so raw distances can tie; jittered generations cannot.
    jitter = np.random.default_rng(0).normal(scale=1e-3, size=digits[:200].shape)
    gens, images = np.clip(digits[:200] + jitter, 0, 1), digits[200:500]  # 300 unseen
    cal = calibrate_threshold(gens, images, TILED, fpr)
    closest = closest_values(gens, images, TILED)
    assert cal.n_images == 300 and cal.n_generated == 200
    assert (closest < cal.tau).sum() == int(np.floor(fpr * 300 + 1e-9))
    assert cal.observed_fpr == pytest.approx((closest < cal.tau).mean()) and cal.observed_fpr <= fpr
    # Judged by mem_percent with that τ, the calibration images ARE the false positives.
    as_secrets = mem_percent(gens, images, policy=TILED.model_copy(update={"threshold": cal.tau}))
    assert as_secrets.fraction == pytest.approx(cal.observed_fpr)


def test_ties_at_tau_only_lower_the_false_positive_count(digits):
    gens, images = digits[:200], digits[200:500]  # quantized: ties happen
    cal = calibrate_threshold(gens, images, TILED, 0.05)
    closest = closest_values(gens, images, TILED)
    assert (closest < cal.tau).sum() <= 15 and (closest <= cal.tau).sum() >= 16


def test_similarities_calibrate_from_the_top(digits):
    rng = np.random.default_rng(0)
    gens, images = rng.normal(size=(50, 16)), rng.normal(size=(40, 16))
    cal = calibrate_threshold(gens, images, COSINE, 0.1)
    best = closest_values(gens, images, COSINE)
    assert (best > cal.tau).sum() == 4 and cal.tau == np.sort(best)[::-1][4]


def test_copies_of_secrets_are_caught_while_unseen_images_stay_at_the_rate(digits):
    """A model that emits noisy copies of 5 'secret' digits among ordinary digits: with τ
    calibrated at 5% on 300 unseen digits, every secret counts as reconstructed."""
    rng = np.random.default_rng(1)
    secrets = digits[1000:1005]
    copies = np.clip(secrets + rng.normal(scale=0.03, size=secrets.shape), 0, 1)
    gens = np.concatenate([digits[:250], copies])
    cal = calibrate_threshold(gens, digits[1200:1500], TILED, 0.05)
    mem = mem_percent(gens, secrets, policy=TILED.model_copy(update={"threshold": cal.tau}))
    assert mem.mem_percent == 100.0 and cal.observed_fpr <= 0.05


def test_conditional_generations_only_count_for_their_own_image(digits):
    gens = digits[:6]
    images = digits[:3]  # image j's exact copy is generation j, but it was prompted for j+3
    owners = [1, 2, 0, 0, 1, 2]
    best = closest_values(gens, images, TILED, generated_for=owners)
    full = tiled_l2_distances(gens, images)
    expected = [min(full[2, 0], full[3, 0]), min(full[0, 1], full[4, 1]),
                min(full[1, 2], full[5, 2])]  # fmt: skip
    np.testing.assert_allclose(best, expected)
    assert (best > 0).all()
    with pytest.raises(ValueError, match="at least one generation"):
        closest_values(gens, images, TILED, generated_for=[0, 0, 0, 1, 1, 1])


def test_refusals(digits):
    with pytest.raises(ValueError, match="at least 100 calibration images, got 50"):
        calibrate_threshold(digits[:10], digits[10:60], TILED, 0.01)
    with pytest.raises(ValueError, match="fpr"):
        calibrate_threshold(digits[:10], digits[10:60], TILED, 0.0)
    with pytest.raises(ValueError, match="fpr"):
        calibrate_threshold(digits[:10], digits[10:60], TILED, 0.6)


RELATIVE = MemorizationPolicy(metric="relative_tiled_l2")


def test_relative_closest_values_are_column_minima_of_the_ratio_matrix(digits):
    gens, images, train = digits[:40], digits[1000:1030], digits[:400]
    np.testing.assert_array_equal(
        closest_values(gens, images, RELATIVE, neighbours=train),
        relative_distances(gens, images, train, RELATIVE).min(axis=0),
    )
    # Stand-in training images exclude their own rows from S; owners restrict as before.
    stand_in = digits[200:203]
    own = [[200], [201], [202]]
    owners = [0, 1, 2, 0, 1, 2]
    got = closest_values(digits[50:56], stand_in, RELATIVE, owners, neighbours=train, exclude=own)
    full = relative_distances(digits[50:56], stand_in, train, RELATIVE, own)
    np.testing.assert_allclose(got, [min(full[0, 0], full[3, 0]), min(full[1, 1], full[4, 1]),
                                     min(full[2, 2], full[5, 2])])  # fmt: skip


@pytest.mark.parametrize("fpr", [0.02, 0.1])
def test_relative_delta_calibrates_on_heldout_and_catches_blurred_copies(digits, fpr):
    """A model that emits training digits and floor-blurred copies of 7 secrets: delta calibrated
    on 300 held-out digits admits floor(fpr * 300) of them and still catches every secret,
    which the fixed absolute tau = 0.08 misses."""
    rng = np.random.default_rng(2)
    train = digits[:1000]
    secrets = train[1:8]  # their floor-blurred copies lie 0.085-0.12 from them
    own = [[i] for i in range(1, 8)]
    box = uniform_filter(secrets, (0, 3, 3, 0), mode="nearest")
    blurred = np.clip(0.6 * secrets + 0.4 * box, 0, 1)
    jitter = rng.normal(scale=1e-3, size=(250, 8, 8, 1))  # break digit ties for the exact count
    gens = np.concatenate([np.clip(train[300:550] + jitter, 0, 1), blurred])
    held = digits[1200:1500]
    cal = calibrate_threshold(gens, held, RELATIVE, fpr, neighbours=train)
    closest = closest_values(gens, held, RELATIVE, neighbours=train)
    assert false_positives(closest, RELATIVE, cal.tau) == int(np.floor(fpr * 300 + 1e-9))
    assert cal.observed_fpr == pytest.approx(false_positives(closest, RELATIVE, cal.tau) / 300)
    mem = mem_percent(gens, secrets, policy=RELATIVE.model_copy(update={"threshold": cal.tau}),
                      neighbours=train, exclude=own)  # fmt: skip
    assert mem.mem_percent == 100.0
    assert mem_percent(gens, secrets, policy=TILED).mem_percent == 0.0


def test_false_positives_counts_strictly_beyond_tau():
    closest = np.array([0.1, 0.2, 0.2, 0.5])
    assert false_positives(closest, TILED, 0.2) == 1
    assert false_positives(closest, TILED, 0.21) == 3
    assert false_positives(closest, COSINE, 0.2) == 1
