"""Mem%: golden tiled-L2 and relative values, copies of real digits detected, unrelated digits
not, and the relative rule's scale-freeness where an absolute tau flips."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.ndimage import uniform_filter
from sklearn.datasets import load_digits

from diffcurate.metrics.memorization import (
    MemorizationPolicy,
    as_unit_images,
    cosine_similarities,
    l2_distances,
    mem_percent,
    relative_distances,
    tile_edges,
    tile_grid,
    tiled_l2_distances,
)


@pytest.fixture(scope="module")
def digits() -> np.ndarray:
    return load_digits().images / 16.0  # [1797, 8, 8] in [0, 1]


def brute_tiled(a: np.ndarray, b: np.ndarray, rows: int, cols: int) -> float:
    """The definition, one image pair and one tile at a time."""
    re, ce = tile_edges(a.shape[0], rows), tile_edges(a.shape[1], cols)
    worst = 0.0
    for (r0, r1), (c0, c1) in itertools.product(itertools.pairwise(re), itertools.pairwise(ce)):
        diff = a[r0:r1, c0:c1] - b[r0:r1, c0:c1]
        worst = max(worst, float(np.sqrt(np.mean(diff**2))))
    return worst


def test_tile_grid_adapts_to_small_images():
    assert tile_grid(512, 512) == (4, 4)  # the paper: 16 tiles of 128x128
    assert tile_grid(8, 8) == (2, 2)  # 4x4-pixel tiles, not 16 tiles of 2x2
    assert tile_grid(64, 12) == (4, 3)
    assert tile_grid(7, 3) == (1, 1)
    assert tile_grid(6, 6, grid=4, min_tile_px=1) == (4, 4)
    assert tile_edges(6, 4).tolist() == [0, 1, 3, 4, 6]
    assert tile_edges(8, 2).tolist() == [0, 4, 8]


def test_golden_tiled_distance_one_changed_tile():
    a = np.zeros((1, 8, 8))
    b = a.copy()
    b[0, :4, :4] = 0.5  # one of the four 4x4 tiles differs by 0.5 everywhere
    assert tiled_l2_distances(a, b)[0, 0] == pytest.approx(0.5)
    # The whole-image L2 dilutes it: sqrt(16 * 0.25 / 64) = 0.25.
    assert l2_distances(a, b)[0, 0] == pytest.approx(0.25)
    # A 1x1 grid is the whole-image distance.
    assert tiled_l2_distances(a, b, grid=1)[0, 0] == pytest.approx(0.25)


def test_golden_tiled_distance_uneven_tiles():
    # 6x6 with a 4x4 grid and 1-pixel minimum: edges 0,1,3,4,6 -> tiles of 1 or 2 pixels a side.
    a = np.full((1, 6, 6), 0.2)
    one_px = a.copy()
    one_px[0, 0, 0] += 0.3  # alone in a 1x1 tile: tile RMS 0.3
    four_px = a.copy()
    four_px[0, 1, 1] += 0.3  # in the 2x2 tile rows 1:3, cols 1:3: RMS sqrt(0.09 / 4) = 0.15
    dist = tiled_l2_distances(a, np.concatenate([one_px, four_px]), min_tile_px=1)
    np.testing.assert_allclose(dist[0], [0.3, 0.15], atol=1e-12)


def test_golden_distance_averages_over_channels():
    a = np.zeros((1, 4, 4, 3))
    b = a.copy()
    b[..., 0] = 0.6  # one channel of three: RMS sqrt(0.36 / 3)
    assert tiled_l2_distances(a, b)[0, 0] == pytest.approx(np.sqrt(0.12))


def test_tiled_distance_equals_brute_force(digits):
    rng = np.random.default_rng(0)
    a = rng.random((3, 10, 13, 3))
    b = rng.random((4, 10, 13, 3))
    got = tiled_l2_distances(a, b, grid=4, min_tile_px=3)
    rows, cols = tile_grid(10, 13, 4, 3)
    want = np.array([[brute_tiled(x, y, rows, cols) for y in b] for x in a])
    np.testing.assert_allclose(got, want, rtol=1e-10)
    d = tiled_l2_distances(digits[:20], digits[20:45])
    want = np.array([[brute_tiled(x, y, 2, 2) for y in digits[20:45]] for x in digits[:20]])
    np.testing.assert_allclose(d, want, rtol=1e-10)
    np.testing.assert_allclose(tiled_l2_distances(digits[:5], digits[:5]).diagonal(), 0, atol=1e-7)


def test_copies_are_reconstructions_and_unrelated_digits_are_not(digits):
    rng = np.random.default_rng(0)
    secrets = digits[:10]
    exact = secrets[0]
    noised = np.clip(secrets[1] + rng.normal(0, 0.05, (8, 8)), 0, 1)
    brighter = np.clip(secrets[2] + 0.04, 0, 1)
    translated = np.roll(secrets[3], 1, axis=1)  # one pixel right
    unrelated = digits[100:160]
    generated = np.concatenate([[exact, noised, brighter, translated], unrelated])

    result = mem_percent(generated, secrets, secret_ids=[f"s{i}" for i in range(10)])
    assert result.metric == "tiled_l2" and result.threshold == 0.08
    reconstructed = [s.secret_id for s in result.secrets if s.reconstructed]
    assert reconstructed == ["s0", "s1", "s2"]
    assert result.n_reconstructed == 3
    assert result.fraction == pytest.approx(0.3) and result.mem_percent == pytest.approx(30.0)
    s0, s1, s2, s3 = result.secrets[:4]
    assert (s0.best_generation, s0.n_matches) == (0, 1)
    assert s0.best_value == pytest.approx(0.0, abs=1e-7)
    assert s1.best_generation == 1 and 0.02 < s1.best_value < 0.08
    # +0.04 everywhere except where clipping at 1 holds a pixel: just under 0.04.
    assert s2.best_generation == 2
    assert s2.best_value == pytest.approx(brute_tiled(brighter, secrets[2], 2, 2), rel=1e-9)
    assert 0.03 < s2.best_value <= 0.04
    # Known limitation of pixel distances: an 8x8 digit shifted by one pixel is far away.
    assert tiled_l2_distances(translated[None], secrets[3][None])[0, 0] > 0.3
    assert not s3.reconstructed and s3.best_value > 0.08
    # Unrelated real digits stay above tau, with a margin.
    unrelated_min = tiled_l2_distances(unrelated, secrets).min()
    assert unrelated_min > 0.08
    assert "mem_percent" in result.model_dump()


def test_threshold_and_metric_are_configurable(digits):
    secrets = digits[:4]
    generated = np.clip(secrets + 0.05, 0, 1)  # every secret copied with a brightness offset
    loose = mem_percent(generated, secrets)
    strict = mem_percent(generated, secrets, policy=MemorizationPolicy(threshold=0.01))
    assert loose.fraction == 1.0 and strict.fraction == 0.0
    whole = mem_percent(generated, secrets, policy=MemorizationPolicy(metric="l2"))
    assert whole.fraction == 1.0 and whole.metric == "l2"


def test_generated_for_restricts_comparisons_to_own_secret(digits):
    secrets = digits[:3]
    generated = np.stack([secrets[0], digits[200], digits[201], digits[202]])
    owners = ["b", "a", "c", "c"]  # the copy of 'a' was prompted with b's caption
    result = mem_percent(generated, secrets, secret_ids=["a", "b", "c"], generated_for=owners)
    assert result.n_reconstructed == 0
    a, b, c = result.secrets
    assert (a.n_generations, a.best_generation) == (1, 1)
    assert (b.n_generations, c.n_generations) == (1, 2)
    # Without the restriction the copy counts for 'a'.
    assert mem_percent(generated, secrets).secrets[0].reconstructed
    with pytest.raises(ValueError, match="unknown secrets"):
        mem_percent(generated, secrets, secret_ids=["a", "b", "c"], generated_for=["z"] * 4)


def test_clip_cosine_on_embeddings():
    rng = np.random.default_rng(1)
    secrets = rng.normal(size=(5, 64))
    near = 3.0 * secrets[0]  # same direction: cosine 1
    noisy = secrets[1] + rng.normal(0, 0.05, 64)
    generated = np.vstack([near, noisy, rng.normal(size=(20, 64))])
    sims = cosine_similarities(generated, secrets)
    assert sims[0, 0] == pytest.approx(1.0)
    want = generated[1] @ secrets[1] / np.linalg.norm(generated[1]) / np.linalg.norm(secrets[1])
    assert sims[1, 1] == pytest.approx(want)
    result = mem_percent(generated, secrets, policy=MemorizationPolicy(metric="clip_cosine"))
    assert result.threshold == 0.95
    assert [s.reconstructed for s in result.secrets] == [True, True, False, False, False]
    assert result.secrets[0].best_value == pytest.approx(1.0)
    with pytest.raises(ValueError, match="non-zero"):
        cosine_similarities(np.zeros((1, 64)), secrets)


def test_image_inputs_are_checked(digits):
    u8 = (digits[:2] * 255).round().astype(np.uint8)
    np.testing.assert_allclose(as_unit_images(u8)[..., 0], u8 / 255.0)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        as_unit_images(digits[:2] * 16)
    with pytest.raises(ValueError, match="shapes differ"):
        tiled_l2_distances(digits[:2], np.zeros((1, 4, 4)))
    with pytest.raises(ValueError, match="NaN"):
        as_unit_images(np.full((1, 4, 4), np.nan))


# ------------------------------------------------------------ relative (Carlini et al. §5.1)
RELATIVE = MemorizationPolicy(metric="relative_tiled_l2")


def box_blur_mix(images: np.ndarray, weight: float) -> np.ndarray:
    """``(1 - weight) * x + weight * (3x3 box blur of x)``: a stand-in for a VAE's floor."""
    blurred = uniform_filter(images, (0, 3, 3), mode="nearest")
    return np.clip((1 - weight) * images + weight * blurred, 0, 1)


def brute_relative(
    gen: np.ndarray, secret: np.ndarray, neighbours: np.ndarray, skip: set[int], n: int,
    alpha: float, rows: int, cols: int,
) -> float:  # fmt: skip
    """The definition for one pair: S = the n nearest non-skipped neighbours of ``gen``."""
    near = sorted(brute_tiled(gen, y, rows, cols) for r, y in enumerate(neighbours)
                  if r not in skip)[:n]  # fmt: skip
    return brute_tiled(gen, secret, rows, cols) / (alpha * float(np.mean(near)))


def test_golden_relative_distance_on_flat_images():
    # 4x4 flat images: one tile, so every distance is |a - b|.
    flat = lambda *v: np.stack([np.full((4, 4), x) for x in v])  # noqa: E731
    gen, secret = flat(0.5), flat(0.55)
    neighbours = flat(0.3, 0.6, 0.9, 0.1)  # distances 0.2, 0.1, 0.4, 0.4 from the generation
    two = RELATIVE.model_copy(update={"n_neighbours": 2})
    # S = {0.6, 0.3}: mean 0.15, so 0.05 / (0.5 * 0.15).
    assert relative_distances(gen, secret, neighbours, two)[0, 0] == pytest.approx(2 / 3)
    # Row 1 (0.6) is a copy of the secret: S = {0.3, one of the 0.4s}, mean 0.3.
    assert relative_distances(gen, secret, neighbours, two, [[1]])[0, 0] == pytest.approx(1 / 3)
    mask = np.array([[False, True, False, False]])
    assert relative_distances(gen, secret, neighbours, two, mask)[0, 0] == pytest.approx(1 / 3)
    # Fewer neighbours than n: S is all four, mean 0.275; alpha scales the denominator.
    wide = RELATIVE.model_copy(update={"n_neighbours": 50, "alpha": 0.25})
    assert relative_distances(gen, secret, neighbours, wide)[0, 0] == pytest.approx(0.05 / 0.06875)
    plain = two.model_copy(update={"metric": "relative_l2"})
    assert relative_distances(gen, secret, neighbours, plain)[0, 0] == pytest.approx(2 / 3)
    # An exact copy whose neighbours all equal it: 0/0 reads as a match, d/0 as infinitely far.
    same = relative_distances(flat(0.5), flat(0.5, 0.7), flat(0.5, 0.5), two)
    assert same[0, 0] == 0.0 and same[0, 1] == np.inf


def test_relative_distance_equals_brute_force():
    rng = np.random.default_rng(3)
    gens, secrets, neighbours = rng.random((4, 10, 13, 3)), rng.random((3, 10, 13, 3)), rng.random(
        (9, 10, 13, 3))  # fmt: skip
    policy = RELATIVE.model_copy(update={"n_neighbours": 3, "alpha": 0.7, "min_tile_px": 3})
    skips = [{0, 4}, set(), {8}]
    got = relative_distances(gens, secrets, neighbours, policy, skips)
    rows, cols = tile_grid(10, 13, 4, 3)
    want = [[brute_relative(g, s, neighbours, skips[j], 3, 0.7, rows, cols)
             for j, s in enumerate(secrets)] for g in gens]  # fmt: skip
    np.testing.assert_allclose(got, want, rtol=1e-10)


def test_rescaling_all_distances_keeps_relative_decisions_while_absolute_tau_flips(digits):
    secrets = digits[1:8]
    neighbours = np.concatenate([digits[10:400], np.repeat(secrets, 2, axis=0)])
    copies = [range(390 + 2 * j, 392 + 2 * j) for j in range(7)]
    rng = np.random.default_rng(0)
    noisy = np.clip(secrets[:3] + rng.normal(0, 0.03, secrets[:3].shape), 0, 1)
    gens = np.concatenate([noisy, digits[500:540]])  # 3 near-copies, 40 distinct digits
    # Contract every image towards grey (a low-contrast rendering): every distance times 0.2.
    squeeze = lambda x: 0.5 + 0.2 * (x - 0.5)  # noqa: E731
    before = relative_distances(gens, secrets, neighbours, RELATIVE, copies)
    after = relative_distances(squeeze(gens), squeeze(secrets), squeeze(neighbours), RELATIVE,
                               copies)  # fmt: skip
    np.testing.assert_allclose(after, before, rtol=1e-9)
    kw = {"neighbours": neighbours, "exclude": copies, "policy": RELATIVE}
    rel = mem_percent(gens, secrets, **kw)
    rel_sq = mem_percent(
        squeeze(gens), squeeze(secrets), **{**kw, "neighbours": squeeze(neighbours)}
    )
    flags = [s.reconstructed for s in rel.secrets]
    assert flags == [True, True, True, False, False, False, False]
    assert [s.reconstructed for s in rel_sq.secrets] == flags
    # The absolute rule agrees at full contrast, but distinct digits (0.26-0.37 from the
    # secrets) fall under tau = 0.08 once contracted: every secret "reconstructed".
    assert [s.reconstructed for s in mem_percent(gens, secrets).secrets] == flags
    assert mem_percent(squeeze(gens), squeeze(secrets)).n_reconstructed == 7


def test_blurred_copies_count_under_the_relative_rule_and_distinct_digits_do_not(digits):
    secrets = digits[1:8]
    neighbours = np.concatenate([digits[10:400], np.repeat(secrets, 2, axis=0)])
    copies = [range(390 + 2 * j, 392 + 2 * j) for j in range(7)]
    gens = np.concatenate([secrets, digits[500:540]])  # exact copies of all 7, then distinct
    blurred = box_blur_mix(gens, 0.4)  # the same floor on every generation
    absolute = tiled_l2_distances(blurred[:7], secrets).diagonal()
    assert absolute.min() > 0.08  # every copy sits above the absolute tau ...
    assert mem_percent(gens, secrets).mem_percent == 100.0
    assert mem_percent(blurred, secrets).mem_percent == 0.0  # ... which then reads 0
    rel = mem_percent(blurred, secrets, policy=RELATIVE, neighbours=neighbours, exclude=copies)
    assert rel.mem_percent == 100.0 and rel.threshold == 0.8
    assert [s.best_generation for s in rel.secrets] == list(range(7))
    ratios = relative_distances(blurred, secrets, neighbours, RELATIVE, copies)
    assert ratios[:7].diagonal().max() < 0.75 and ratios[7:].min() > 1.2
    assert (rel.alpha, rel.n_neighbours, rel.n_neighbour_images) == (0.5, 50, 404)
    # Distinct digits alone: nothing reconstructed.
    alone = mem_percent(blurred[7:], secrets, policy=RELATIVE, neighbours=neighbours,
                        exclude=copies)  # fmt: skip
    assert alone.n_reconstructed == 0


def test_excluding_a_secrets_copies_makes_its_score_independent_of_duplication(digits):
    secret = digits[[3]]
    others = digits[10:200]
    near = np.clip(secret + np.random.default_rng(1).normal(0, 0.05, secret.shape), 0, 1)
    rows, cols = tile_grid(8, 8)
    literal, excluded = [], []
    for k in (1, 20, 45):  # the secret duplicated k times among the training neighbours
        neighbours = np.concatenate([others, np.repeat(secret, k, axis=0)])
        own = [range(190, 190 + k)]
        literal.append(relative_distances(near, secret, neighbours, RELATIVE)[0, 0])
        excluded.append(relative_distances(near, secret, neighbours, RELATIVE, own)[0, 0])
        assert literal[-1] == pytest.approx(
            brute_relative(near[0], secret[0], neighbours, set(), 50, 0.5, rows, cols)
        )
    # With its copies in S the near-copy looks farther the more often it was duplicated ...
    assert literal[0] < literal[1] < literal[2] and literal[2] > 0.8 > literal[0]
    # ... without them its score is the same whatever k.
    assert excluded == pytest.approx([excluded[0]] * 3, rel=1e-12) and excluded[0] < literal[0]
    assert excluded[0] == pytest.approx(
        brute_relative(near[0], secret[0], others, set(), 50, 0.5, rows, cols)
    )
    # An exact copy scores 0 either way.
    assert relative_distances(secret, secret, others, RELATIVE)[0, 0] == 0.0


def test_default_delta_separates_heldout_digits_from_noisy_copies(digits):
    """The documented origin of delta = 0.8: no held-out digit scores under it against
    generations that are training digits, and noisy copies score well under it."""
    train, held = digits[:1000], digits[1000:1300]
    best = relative_distances(train[:300], held, train, RELATIVE).min(axis=0)
    assert 0.8 < best.min() < 0.9
    secrets = train[500:520]
    noisy = np.clip(secrets + np.random.default_rng(0).normal(0, 0.05, secrets.shape), 0, 1)
    own = [[500 + j] for j in range(20)]
    ratios = relative_distances(noisy, secrets, train, RELATIVE, own).diagonal()
    assert ratios.max() < 0.7


def test_relative_metric_refusals(digits):
    with pytest.raises(ValueError, match="needs training neighbours"):
        mem_percent(digits[:2], digits[:2], policy=RELATIVE)
    with pytest.raises(ValueError, match="exclude has 1 entries for 2 secrets"):
        mem_percent(digits[:2], digits[:2], policy=RELATIVE, neighbours=digits[5:9], exclude=[[0]])
    with pytest.raises(ValueError, match="outside the 4 neighbours"):
        relative_distances(digits[:1], digits[:1], digits[5:9], RELATIVE, [[4]])
    with pytest.raises(ValueError, match=r"mask has shape \(1, 3\)"):
        relative_distances(digits[:1], digits[:1], digits[5:9], RELATIVE, np.ones((1, 3), bool))
    with pytest.raises(ValueError, match="no neighbour left"):
        relative_distances(digits[:1], digits[:1], digits[5:7], RELATIVE, [[0, 1]])
    with pytest.raises(ValueError, match="not a relative metric"):
        relative_distances(digits[:1], digits[:1], digits[5:7], MemorizationPolicy())
