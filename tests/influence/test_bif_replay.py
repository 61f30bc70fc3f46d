"""Replayed BIF chains: bit-equal to the stored states and to ``bif_risk``, shard-independent,
verified against the recorded digests, and stored in O(C·T) bytes whatever the model size."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from diffcurate.influence.bif import BIFConfig, bif_risk
from diffcurate.influence.bif_draws import PosteriorDraws
from diffcurate.influence.bif_replay import (
    DIGESTS,
    ReplayedDraws,
    ReplayMismatchError,
    state_digest,
)
from diffcurate.influence.objective import DiffusionObjective, TimestepSchedule
from diffcurate.influence.registry import (
    BIFOptions,
    FitSet,
    ScorerSpec,
    prepare_state,
    score_function,
)
from tiny_unets import captions, images, scheduler, tiny_cond_unet, tiny_mlp, tiny_unet

CONFIG = BIFConfig(
    step_size=1e-4, localization=1e3, nbeta=50.0, chains=2, draws=3, burn_in=1, thinning=2,
    batch_size=3, dtype="float64", batch_items=5,
)  # fmt: skip


def objective() -> DiffusionObjective:
    return DiffusionObjective(
        scheduler(), TimestepSchedule(timesteps=(20, 200), draws_per_sample=1), seed=3
    )


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A real diffusers UNet (conv, group norm, attention), an SGLD set of 6 and 8 to score."""
    obj, model = objective(), tiny_unet().double()
    sgld_x = images(6, (1, 8, 8), seed=11)
    sgld_keys = [f"fit{i}" for i in range(6)]
    x = torch.cat([sgld_x[:3], images(5, (1, 8, 8), seed=12)])
    keys = sgld_keys[:3] + [f"new{i}" for i in range(5)]
    root = tmp_path_factory.mktemp("bif")
    stored = PosteriorDraws.record(obj, model, sgld_x, sgld_keys, CONFIG, root / "stored")
    replay = ReplayedDraws.record(obj, model, sgld_x, sgld_keys, CONFIG, root / "replay")
    return obj, model, sgld_x, sgld_keys, x, keys, stored, replay


def test_replayed_scores_equal_stored_states_and_bif_risk_bit_for_bit(setup):
    obj, model, sgld_x, sgld_keys, x, keys, stored, replay = setup
    from_replay = replay.traces(obj, model, x, keys)
    from_states = stored.traces(obj, model, x, keys)
    assert np.isfinite(from_replay).all() and from_replay.std(axis=(0, 1)).min() > 0
    assert np.array_equal(from_replay, from_states)
    direct = bif_risk(obj, model, x, keys, CONFIG, sgld_images=sgld_x, sgld_keys=sgld_keys)
    for res in (replay.risk(obj, model, x, keys), stored.risk(obj, model, x, keys)):
        assert np.array_equal(res.score, direct.score)
        assert np.array_equal(res.stderr, direct.stderr)
        assert res.method == direct.method and res.sample_keys == direct.sample_keys
    assert np.array_equal(replay.sgld_loss, stored.sgld_loss, equal_nan=True)


def test_replay_is_independent_of_shard_boundaries_and_order(setup, tmp_path):
    """Every shard replays the same states (each is checked against its digest), so a sample's
    losses depend only on its own keyed draws. Bit-equality needs one item per forward pass:
    batched kernels round a sample's output differently with other samples beside it, on the
    stored path alike, so with batches the shard scores match to float64 rounding."""
    obj, model, sgld_x, sgld_keys, x, keys, stored, batched = setup
    config = CONFIG.model_copy(update={"batch_items": 1})
    replay = ReplayedDraws.record(obj, model, sgld_x, sgld_keys, config, tmp_path)
    full = replay.risk(obj, model, x, keys).score
    batched_full = batched.risk(obj, model, x, keys).score
    for cuts in ((0, 3, 8), (0, 1, 2, 7, 8)):
        pieces = list(itertools.pairwise(cuts))
        parts = [replay.risk(obj, model, x[a:b], keys[a:b]).score for a, b in pieces]
        assert np.array_equal(np.concatenate(parts), full)
        parts = [batched.risk(obj, model, x[a:b], keys[a:b]).score for a, b in pieces]
        np.testing.assert_allclose(np.concatenate(parts), batched_full, rtol=1e-12, atol=0)
        for a, b in pieces:  # shard by shard, replay and stored states still agree exactly
            want = stored.risk(obj, model, x[a:b], keys[a:b]).score
            assert np.array_equal(batched.risk(obj, model, x[a:b], keys[a:b]).score, want)
    order = [5, 0, 7, 2, 6, 1, 4, 3]
    shuffled = replay.risk(obj, model, x[order], [keys[i] for i in order]).score
    assert np.array_equal(shuffled, full[order])


def test_digests_are_those_of_the_recorded_states(setup):
    *_, stored, replay = setup
    states = stored.states()
    net = tiny_unet().double()
    params = [p for p in net.parameters() if p.requires_grad]
    sizes = [p.numel() for p in params]
    for row, digest in zip(states, replay.digests(), strict=True):
        with torch.no_grad():
            for p, part in zip(params, torch.from_numpy(np.array(row)).split(sizes), strict=True):
                p.copy_(part.reshape(p.shape))
        assert state_digest(net) == digest.tobytes()
    # b = 1: no chain records w* itself, so every recorded state differs.
    assert len({d.tobytes() for d in replay.digests()}) == CONFIG.chains * CONFIG.draws


def test_a_replay_that_drifts_from_the_record_is_refused(setup, tmp_path):
    obj, model, sgld_x, sgld_keys, x, keys, _, _ = setup
    replay = ReplayedDraws.record(obj, model, sgld_x, sgld_keys, CONFIG, tmp_path / "r")
    digests = replay.digests()
    digests[CONFIG.draws + 2, 0] ^= 1  # chain 1, last draw
    np.save(tmp_path / "r" / DIGESTS, digests)
    with pytest.raises(ReplayMismatchError, match=r"chain 1, draw 2"):
        replay.traces(obj, model, x[:2], keys[:2])
    other = tiny_unet(seed=1).double()  # another w*: the very first state differs
    with pytest.raises(ReplayMismatchError, match=r"chain 0, draw 0"):
        replay.traces(obj, other, x[:2], keys[:2])


def test_a_complete_record_is_reused_not_rerun(setup, tmp_path, monkeypatch):
    obj, model, sgld_x, sgld_keys, *_ = setup
    ReplayedDraws.record(obj, model, sgld_x, sgld_keys, CONFIG, tmp_path)
    monkeypatch.setattr(
        "diffcurate.influence.bif_replay.sgld_chains",
        lambda *a, **k: pytest.fail("the chains were run again"),
    )
    again = ReplayedDraws.record(obj, model, sgld_x, sgld_keys, CONFIG, tmp_path)
    assert json.loads((tmp_path / "meta.json").read_text())["n_draws"] == 6
    assert again.digests().shape == (6, 32)


def test_conditional_unet_replays_exactly(tmp_path):
    obj, model = objective(), tiny_cond_unet().double()
    x, cond, keys = images(5, (1, 8, 8), seed=4), captions(5), [f"c{i}" for i in range(5)]
    config = CONFIG.model_copy(update={"gradient_draws": "keyed"})
    replay = ReplayedDraws.record(obj, model, x, keys, config, tmp_path, sgld_cond=cond)
    got = replay.risk(obj, model, x[1:], keys[1:], cond[1:])
    want = bif_risk(obj, model, x[1:], keys[1:], config, cond[1:],
                    sgld_images=x, sgld_keys=keys, sgld_cond=cond)  # fmt: skip
    assert np.array_equal(got.score, want.score)


def test_replay_disk_does_not_grow_with_the_model_and_stored_disk_is_ctd(tmp_path):
    obj = objective()
    x, keys = images(4, (1, 3, 3), seed=5), [f"m{i}" for i in range(4)]
    sizes = {}
    for hidden in (8, 64):
        model = tiny_mlp(hidden=hidden)
        d = sum(p.numel() for p in model.parameters())
        stored = PosteriorDraws.record(obj, model, x, keys, CONFIG, tmp_path / f"s{hidden}")
        replay = ReplayedDraws.record(obj, model, x, keys, CONFIG, tmp_path / f"r{hidden}")
        states_file = (stored.path / "states.npy").stat().st_size
        assert CONFIG.chains * CONFIG.draws * d * 8 <= states_file
        assert states_file <= CONFIG.chains * CONFIG.draws * d * 8 + 128
        assert stored.memory_bytes() == d * 8
        sizes[hidden] = (replay.disk_bytes(), stored.disk_bytes(), replay.memory_bytes())
    assert abs(sizes[64][0] - sizes[8][0]) <= 2  # the digits of n_params in meta.json
    assert sizes[64][1] > 4 * sizes[8][1]
    assert sizes[64][2] > sizes[8][2]  # w*, gradients and noise do grow with d


@pytest.mark.parametrize("states", ["stored", "replay"])
def test_registry_paths_give_equal_scores_and_the_same_run_identity(states, tmp_path):
    model = tiny_unet().double()
    opts = {"chains": 2, "draws": 3, "burn_in": 1, "thinning": 2, "batch_size": 3}
    spec = ScorerSpec(signal="bif", dtype="float64", bif=BIFOptions(states=states, **opts))
    other = "replay" if states == "stored" else "stored"
    twin = ScorerSpec(signal="bif", dtype="float64", bif=BIFOptions(states=other, **opts))
    assert spec.fingerprint_payload() == twin.fingerprint_payload()
    assert spec.bif_config == twin.bif_config
    obj = spec.objective(scheduler())
    fit_x, fit_keys = images(6, (1, 8, 8), seed=11), tuple(f"fit{i}" for i in range(6))
    state = prepare_state(spec, obj, model, FitSet(fit_x, fit_keys, 6), tmp_path)
    kind = PosteriorDraws if states == "stored" else ReplayedDraws
    assert isinstance(state.posterior, kind)
    x, keys = images(4, (1, 8, 8), seed=12), [f"s{i}" for i in range(4)]
    got = score_function(spec, state)(obj, model, x, keys)
    want = bif_risk(obj, model, x, keys, spec.bif_config, sgld_images=fit_x, sgld_keys=fit_keys)
    assert np.array_equal(got.score, want.score)
    disk, memory = state.shared_bytes()
    d = sum(p.numel() for p in model.parameters())
    if states == "stored":
        assert disk >= fit_x.nbytes + 6 * d * 8 and memory == fit_x.nbytes + d * 8
    else:
        assert fit_x.nbytes < disk < fit_x.nbytes + 4096 and memory > fit_x.nbytes + 2 * d * 8


def test_auto_stores_small_models_and_replays_beyond_the_limit(tmp_path, monkeypatch):
    import diffcurate.influence.registry as registry

    opts = BIFOptions(chains=4, draws=100)
    limit = registry.STORED_STATES_LIMIT
    assert opts.states_for(limit // (400 * 4), 4) == "stored"
    assert opts.states_for(limit // (400 * 4) + 1, 4) == "replay"
    assert opts.states_for(701_345, 4) == "stored"  # the reference model: 1.05 GiB
    assert opts.states_for(859_520_964, 4) == "replay"  # a Stable-Diffusion-1.5 UNet
    assert BIFOptions(states="stored").states_for(10**12, 8) == "stored"
    assert BIFOptions(states="replay").states_for(1, 4) == "replay"
    model = tiny_unet().double()
    spec = ScorerSpec(signal="bif", dtype="float64", bif=BIFOptions(chains=2, draws=2))
    obj = spec.objective(scheduler())
    fit = FitSet(images(4, (1, 8, 8), seed=1), tuple(f"f{i}" for i in range(4)), 4)
    assert isinstance(prepare_state(spec, obj, model, fit, tmp_path).posterior, PosteriorDraws)
    import diffcurate.influence.scorers.bif as bif_scorer

    monkeypatch.setattr(bif_scorer, "STORED_STATES_LIMIT", 2 * 2 * 8 * 1000)  # < C·T·d·8
    assert isinstance(prepare_state(spec, obj, model, fit, tmp_path).posterior, ReplayedDraws)
