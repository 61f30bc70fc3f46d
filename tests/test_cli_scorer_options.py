"""Scorer settings on the command line agree with the scorers' options models: every default
of a named flag equals its model's, and `--option` reaches any option of any scorer."""

import inspect

import pytest

from diffcurate.attribution import attribution_scorers
from diffcurate.cli import deploy, run, score
from diffcurate.cli.scorer_options import (
    COMMON_FLAGS,
    SCORE_FLAGS,
    flag_settings,
    parse_options,
)
from diffcurate.influence.registry import ScorerSpec, get_scorer, scorer_names, scorers
from diffcurate.influence.scorers import BUILTIN


def _defaults(command) -> dict:
    return {name: p.default for name, p in inspect.signature(command).parameters.items()}


def test_every_named_flag_default_equals_its_options_model_default():
    cli = _defaults(score.score)
    checked = 0
    for flag in SCORE_FLAGS:
        assert flag.param in cli, flag.param
        for name in flag.scorers:
            field = get_scorer(name).options_model.model_fields[flag.field]
            # None = "not given": the scorer's own default applies (e.g. --damping).
            if cli[flag.param] is not None:
                assert cli[flag.param] == field.default, (flag.param, name)
                checked += 1
    assert checked >= 15
    for param, field in COMMON_FLAGS.items():
        if cli[param] is not None:
            assert cli[param] == ScorerSpec.model_fields[field].default, param


def test_the_scorer_flags_default_to_the_specs_default_scorer():
    spec_default = ScorerSpec().signal
    assert _defaults(score.score)["scorer"] == spec_default
    assert _defaults(run.run_hygiene)["scorer"] == spec_default
    assert _defaults(deploy.serve_cmd)["scorer"] == spec_default
    assert _defaults(run.evaluate)["scorers"].split(",")[0] == spec_default


def test_help_texts_list_every_builtin_scorer():
    for s in BUILTIN:
        assert s.name in score.SCORER_HELP, s.name
    for name in attribution_scorers():
        assert name in score.ATTRIBUTE_HELP, name
    assert set(attribution_scorers()) == {"ekfac", "bif", "trak", "d-trak", "dmin"}


def test_named_flags_set_only_the_chosen_scorers_options():
    values = _defaults(score.score) | {"bif_states": "replay", "sgld_chains": 3}
    spec = ScorerSpec.from_settings("bif", flag_settings("bif", values))
    assert spec.options.states == "replay" and spec.options.chains == 3
    assert spec == ScorerSpec(signal="bif", bif={"states": "replay", "chains": 3})
    # The defaults of every flag give the spec's defaults, for every built-in scorer.
    for s in scorer_names():
        flags = _defaults(score.score) | {"knn_mode": "duplicates"}
        assert ScorerSpec.from_settings(s, flag_settings(s, flags)) == ScorerSpec(signal=s), s


def test_option_reaches_any_setting_and_refuses_unknown_ones():
    got = parse_options(["states=replay", "timesteps=20,100", "bif.chains=3", "index=none"],
                        ["bif", "dmin"])  # fmt: skip
    assert got == {
        "bif": {"states": "replay", "timesteps": ["20", "100"], "chains": 3},
        "dmin": {"timesteps": ["20", "100"], "index": "none"},
    }
    spec = ScorerSpec.from_settings("bif", got["bif"])
    assert spec.timesteps == (20, 100) and spec.options.states == "replay"
    assert parse_options(["damping=null"], ["trak"])["trak"] == {"damping": None}
    with pytest.raises(ValueError, match="no setting 'nope' for loss"):
        parse_options(["nope=1"], ["loss"])
    with pytest.raises(ValueError, match="not a selected scorer"):
        parse_options(["bif.chains=2"], ["loss"])
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_options(["chains"], ["bif"])
    for s in scorers():  # every option of every scorer is reachable
        for field in s.options_model.model_fields:
            assert field in parse_options([f"{field}=1"], [s.name])[s.name]
