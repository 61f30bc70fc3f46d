"""A scorer defined and registered in this file alone runs through `diffcurate score`, `run` and
`attribute`: the registry is the only place the product learns about a method."""

import json

import numpy as np
import pytest
from pydantic import BaseModel, Field
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.demo.writers import write_folder
from diffcurate.influence.objective import ScoreResult
from diffcurate.influence.registry import (
    ScorerSpec,
    get_scorer,
    register_scorer,
    unregister_scorer,
)
from diffcurate.influence.scorers.base import OPTIONS, BaseScorer, Needs
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger

pytestmark = pytest.mark.usefixtures("prefect_harness")
runner = CliRunner()


class ToyOptions(BaseModel):
    model_config = OPTIONS
    weight: float = Field(1.0, gt=0)


class ToyScorer(BaseScorer):
    """Risk = weight × mean input value; attribution = −squared distance to the query."""

    name = "toy"
    summary = "test scorer"
    options_model = ToyOptions
    default_timesteps = (7,)
    needs = Needs()
    attributes = True

    def risk(self, spec, state):
        weight = spec.options.weight

        def score(obj, model, x, keys, cond=None, uncond=None):
            values = weight * x.detach().double().flatten(1).mean(dim=1).numpy()
            return ScoreResult(
                sample_keys=tuple(keys), score=values, stderr=np.full(len(keys), np.nan),
                per_layer=None, layer_names=(), per_timestep=None,
                timesteps=tuple(obj.schedule.timesteps or ()), method=f"toy/w{weight:g}",
            )  # fmt: skip

        return score

    def attribute(self, spec, state, objective, model, query, query_keys, query_cond):
        q = query.detach().double().flatten(1)

        def shard(x, keys, cond):
            diff = q[:, None, :] - x.detach().double().flatten(1)[None]
            return -(diff**2).sum(dim=-1).numpy()

        return shard


@pytest.fixture
def toy():
    scorer = register_scorer(ToyScorer())
    yield scorer
    unregister_scorer("toy")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def test_a_scorer_registered_here_scores_runs_and_attributes(toy, tmp_path, digit_files):
    assert get_scorer("toy") is toy
    write_folder(digit_files, tmp_path / "src")  # 60 digits + 3 copies of digit 5
    ws = tmp_path / "ws"
    assert invoke("ingest", tmp_path / "src", "-d", "digits", "-w", ws).exit_code == 0
    res = invoke("train", "-d", "digits", "--arch", "tiny", "--steps", 2, "--batch-size", 8,
                 "-w", ws)  # fmt: skip
    assert res.exit_code == 0, res.output
    model = ws / "models" / "digits-tiny" / "checkpoints" / "step-00000002"

    # score: its options come from --option, validated by its own options model.
    res = invoke("score", "-d", "digits", "-m", model, "-s", "toy", "-o", "weight=2", "-w", ws)
    assert res.exit_code == 0, res.output
    assert "toy (toy/w2) at t=[7]" in res.output
    ledger = Ledger(ws / "ledger.duckdb")
    run = next(r for r in ledger.runs(kind="score") if r.status == "completed")
    spec = ScorerSpec.model_validate(run.params["scorer"])
    assert spec.options == ToyOptions(weight=2.0) and spec.fingerprint_payload()["toy"] == {
        "weight": 2.0
    }
    assert LanceStore(str(ws / "lancedb")).count("scores") == 63
    res = invoke("score", "-d", "digits", "-m", model, "-s", "toy", "-o", "weight=-1", "-w", ws)
    assert res.exit_code == 2 and "weight" in res.output
    res = invoke("score", "-d", "digits", "-m", model, "-s", "toy", "-o", "nope=1", "-w", ws)
    assert res.exit_code == 2 and "no setting 'nope' for toy" in res.output

    # attribute: a training image as the query ranks itself first (distance 0).
    sample = digit_files[7]
    query = tmp_path / "src" / f"{sample.key}.{sample.ext}"
    res = invoke("attribute", query, "-m", model, "-s", "toy", "-d", "digits", "-k", 3, "-w", ws)
    assert res.exit_code == 0, res.output
    assert "toy (exact over the dataset)" in res.output
    top = next(ln for ln in res.output.splitlines() if ln.strip().startswith("│ 1 "))
    assert sample.key in top and top.split("│")[2].strip() in ("0", "-0")

    # run: the hygiene flow scores with it (reusing nothing) and flags, mitigates, gates.
    (tmp_path / "secrets.json").write_text(json.dumps(["dup-0"]))
    res = invoke("run", "-d", "digits", "-m", model, "-s", "toy", "-o", "weight=3",
                 "--secrets", tmp_path / "secrets.json", "--generations", 4, "--max-mem", 100,
                 "--inference-steps", 2, "-w", ws)  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    assert "gate decision" in res.output
    signals = [r.params["scorer"]["options"] for r in ledger.runs(kind="score")]
    assert {"weight": 3.0} in signals
