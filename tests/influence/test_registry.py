"""The scorer registry and ScorerSpec: the protocol, options validated by the scorer, run
identities and stored specs from before the options union, and BIF attribution's hook."""

import numpy as np
import pytest

from diffcurate.influence.bif import bif_attribution
from diffcurate.influence.registry import (
    BIFOptions,
    FitSet,
    ScorerSpec,
    get_scorer,
    prepare_state,
    register_scorer,
    scorer_names,
    scorers,
)
from diffcurate.influence.scorers import BUILTIN
from diffcurate.influence.scorers.base import NoOptions, Scorer
from tiny_unets import images, scheduler, tiny_unet

# A spec as the ledger stored it before the options union: every scorer's options as a field.
LEGACY_BIF = {
    "signal": "bif", "timesteps": None, "draws_per_timestep": 2, "probes": 2, "seed": 0,
    "dtype": "float32", "device": "cpu", "generations": 4, "inference_steps": 50,
    "measure_steps": 1, "guidance_scale": 7.5, "fit_size": 512,
    "ekfac": {"damping": 1e-08, "fisher": "mc", "fisher_samples": 1, "train_batch_size": 8,
              "query_batch_size": 8, "int8_query": False},
    "bif": {"states": "replay", "step_size": 1e-05, "localization": 10000.0, "nbeta": 200.0,
            "chains": 2, "draws": 3, "burn_in": 0, "thinning": 1, "batch_size": 1024,
            "gradient_draws": "fresh", "batch_items": 64},
    "trak": {"proj_dim": 2048, "projection": "rademacher", "damping": None, "batch_size": 16,
             "projection_cache": 67108864},
    "global_hessian": {"batch_size": 64, "probes": 16, "exact": False},
    "clip_knn": {"mode": "duplicates", "tau": 0.95, "k": 5, "secrets": []},
    "dmin": {"sketch_dim": 4096, "n_timesteps": 10, "noise": "shared", "batch_size": 8,
             "index": "ivf_hnsw_sq"},
}  # fmt: skip
# Its run identity as computed then.
LEGACY_BIF_PAYLOAD = {
    "signal": "bif", "timesteps": [20], "draws_per_timestep": 2, "probes": 2, "seed": 0,
    "dtype": "float32", "device": "cpu", "generations": 4, "inference_steps": 50,
    "measure_steps": 1, "guidance_scale": 7.5, "fit_size": 512,
    "bif": {"step_size": 1e-05, "localization": 10000.0, "nbeta": 200.0, "chains": 2,
            "draws": 3, "burn_in": 0, "thinning": 1, "batch_size": 1024,
            "gradient_draws": "fresh", "batch_items": 64},
}  # fmt: skip


def test_every_builtin_implements_the_protocol_and_is_registered():
    assert [s.name for s in scorers()][: len(BUILTIN)] == [s.name for s in BUILTIN]
    for s in BUILTIN:
        assert isinstance(s, Scorer) and get_scorer(s.name) is s
    assert "dmin" not in scorer_names(risk=True) and "dmin" in scorer_names(risk=False)
    with pytest.raises(ValueError, match="already registered"):
        register_scorer(BUILTIN[0])
    with pytest.raises(ValueError, match=r"unknown signal 'nope': no scorer .*; use one of trace"):
        ScorerSpec(signal="nope")


def test_options_are_the_scorers_model_and_stored_specs_stay_readable():
    spec = ScorerSpec.model_validate(LEGACY_BIF)
    assert spec.options == BIFOptions(states="replay", chains=2, draws=3)
    assert spec.fingerprint_payload() == LEGACY_BIF_PAYLOAD
    assert ScorerSpec.model_validate(spec.model_dump(mode="json")) == spec
    assert spec.model_dump(mode="json")["options"]["states"] == "replay"
    assert ScorerSpec(signal="loss").options == NoOptions()
    with pytest.raises(ValueError, match="bif takes BIFOptions"):
        ScorerSpec(signal="bif", options=NoOptions())
    with pytest.raises(ValueError, match="extra"):
        ScorerSpec(signal="bif", options={"sketch_dim": 3})
    # d-trak shares trak's options and their key in the run identity.
    dtrak = ScorerSpec(signal="d-trak", trak={"proj_dim": 64})
    assert dtrak.fingerprint_payload()["trak"]["proj_dim"] == 64
    assert dtrak.config.measurement == "square"


def test_bif_attribution_hook_equals_bif_attribution_on_the_run_posterior(tmp_path):
    model = tiny_unet().double()
    opts = BIFOptions(chains=2, draws=3, batch_size=3, states="stored")
    spec = ScorerSpec(signal="bif", dtype="float64", bif=opts)
    obj = spec.objective(scheduler())
    fit_x, fit_keys = images(6, (1, 8, 8), seed=11), tuple(f"fit{i}" for i in range(6))
    state = prepare_state(spec, obj, model, FitSet(fit_x, fit_keys, 6), tmp_path)
    x, keys = images(4, (1, 8, 8), seed=12), [f"s{i}" for i in range(4)]
    q, q_keys = images(2, (1, 8, 8), seed=13), ["q0", "q1"]
    attribute = spec.scorer.attribute(spec, state, obj, model, q, q_keys, None)
    got = np.concatenate([attribute(x[:2], keys[:2], None), attribute(x[2:], keys[2:], None)], 1)
    want = bif_attribution(obj, model, x, keys, q, q_keys, spec.bif_config,
                           sgld_images=fit_x, sgld_keys=fit_keys).scores  # fmt: skip
    assert got.shape == (2, 4)
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-14)
