"""Scorer settings on the command line: the named flags of ``score`` and the generic
``--option KEY=VALUE`` of ``score``, ``run``, ``eval`` and ``attribute``.

Both end in one :class:`~diffcurate.influence.registry.ScorerSpec`, validated by the scorer's
options model, so a scorer registered at run time is configurable without a new flag. The
named flags exist for the common settings; :data:`SCORE_FLAGS` says which options field each
one sets. Their literal defaults keep ``--help`` free of torch imports; a test checks each
against the options model's default (a flag defaulting to None leaves the scorer's own).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import typer

OptionOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-o",
        help="Scorer setting KEY=VALUE, repeatable: a field of the scorer's options (e.g. "
        "`states=replay` for bif) or a common setting (`timesteps=20,100`, `fit_size=64`); "
        "`SCORER.KEY=VALUE` sets one scorer's (eval). Values are JSON where they parse "
        "(`null`, `true`, numbers), else text; comma-separated for lists.",
    ),
]


@dataclass(frozen=True)
class ScorerFlag:
    """A named ``score`` flag that sets ``field`` of the options of ``scorers``."""

    param: str
    field: str
    scorers: tuple[str, ...]


SCORE_FLAGS: tuple[ScorerFlag, ...] = (
    ScorerFlag("damping", "damping", ("ekfac", "trak", "d-trak")),
    ScorerFlag("fisher", "fisher", ("ekfac",)),
    ScorerFlag("proj_dim", "proj_dim", ("trak", "d-trak")),
    ScorerFlag("sgld_chains", "chains", ("bif",)),
    ScorerFlag("sgld_draws", "draws", ("bif",)),
    ScorerFlag("sgld_step_size", "step_size", ("bif",)),
    ScorerFlag("sgld_nbeta", "nbeta", ("bif",)),
    ScorerFlag("sgld_localization", "localization", ("bif",)),
    ScorerFlag("sgld_batch", "batch_size", ("bif",)),
    ScorerFlag("bif_states", "states", ("bif",)),
    ScorerFlag("hessian_batch", "batch_size", ("global-hessian",)),
    ScorerFlag("probes", "probes", ("global-hessian",)),
    ScorerFlag("knn_mode", "mode", ("clip-knn",)),
    ScorerFlag("knn_tau", "tau", ("clip-knn",)),
    ScorerFlag("knn_k", "k", ("clip-knn",)),
    ScorerFlag("secrets", "secrets", ("clip-knn",)),
    ScorerFlag("sketch_dim", "sketch_dim", ("dmin",)),
    ScorerFlag("sketch_timesteps", "n_timesteps", ("dmin",)),
)
"""``score``'s scorer-specific flags (typer parameter → options field of those scorers)."""

COMMON_FLAGS: dict[str, str] = {
    "draws": "draws_per_timestep",
    "probes": "probes",
    "seed": "seed",
    "generations": "generations",
    "inference_steps": "inference_steps",
    "measure_steps": "measure_steps",
    "guidance_scale": "guidance_scale",
    "fit_size": "fit_size",
    "device": "device",
    "dtype": "dtype",
}
"""``score``'s flags of :class:`ScorerSpec`'s common fields (typer parameter → field)."""


def _value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def parse_options(pairs: Iterable[str] | None, signals: Sequence[str]) -> dict[str, dict[str, Any]]:
    """``KEY=VALUE`` / ``SCORER.KEY=VALUE`` → settings per scorer of ``signals``.

    An unprefixed key goes to every scorer whose spec has it (a common field or an options
    field); a key no selected scorer has is an error, as is a prefix naming another scorer.
    """
    from diffcurate.influence.registry import ScorerSpec, get_scorer

    common = set(ScorerSpec.model_fields) - {"signal", "options"}
    out: dict[str, dict[str, Any]] = {s: {} for s in signals}
    for pair in pairs or ():
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--option {pair!r}: expected KEY=VALUE")
        target, _, name = key.strip().rpartition(".")
        if target and target not in out:
            raise ValueError(f"--option {pair!r}: {target} is not a selected scorer")
        matched = False
        chosen = [target] if target else list(signals)
        for signal in chosen:
            scorer = get_scorer(signal)
            fields = scorer.options_model.model_fields
            if name not in common and name not in fields:
                continue
            annotation = (ScorerSpec.model_fields.get(name) or fields[name]).annotation
            value = _value(text)
            if "tuple" in str(annotation) and not isinstance(value, list):
                value = [v.strip() for v in str(value).split(",") if v.strip()]
            out[signal][name] = value
            matched = True
        if not matched:
            where = target or ", ".join(signals)
            raise ValueError(f"--option {pair!r}: no setting {name!r} for {where}")
    return out


def flag_settings(signal: str, values: Mapping[str, Any]) -> dict[str, Any]:
    """``score``'s named flags (typer parameter → value) as settings of ``signal``: the common
    fields, and the options fields of the flags that apply to it; unset (None) flags leave the
    defaults."""
    settings = {COMMON_FLAGS[p]: v for p, v in values.items() if p in COMMON_FLAGS}
    settings = {k: v for k, v in settings.items() if v is not None}
    for flag in SCORE_FLAGS:
        value = values.get(flag.param)
        if signal in flag.scorers and value is not None:
            settings[flag.field] = value
    return settings
