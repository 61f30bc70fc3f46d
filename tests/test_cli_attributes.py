"""``diffcurate audit-attributes``: labels a dataset from the settings, stores them once, and
refuses what it cannot do."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.storage.attributes import read_attributes
from diffcurate.storage.lance_store import LanceStore
from workspaces import ingest_samples

runner = CliRunner()
TOML = """
[attributes]
faces = true
[attributes.captions.shape]
round = ["zero", "six", "eight", "nine"]
straight = ["one", "seven"]
"""


@pytest.mark.usefixtures("prefect_harness")
def test_audit_attributes_labels_stores_and_is_idempotent(tmp_path, digit_files, monkeypatch):
    ws = ingest_samples(tmp_path, digit_files[:20])
    config = tmp_path / "diffcurate.toml"
    config.write_text(TOML)
    monkeypatch.setenv("DIFFCURATE_CONFIG", str(config))
    res = runner.invoke(app, ["audit-attributes", "-d", "digits", "-w", str(ws)])
    assert res.exit_code == 0, res.output
    assert "caption-keywords" in res.output and "opencv-" in res.output
    assert "inferred by the models named above" in res.output
    frame, prov = read_attributes(LanceStore(str(ws / "lancedb")), "digits")
    assert set(prov) == {"shape", "faces"} and len(frame) == 20
    assert set(frame["faces"]) == {"0"}  # 8x8 digits: smaller than any detectable face
    again = runner.invoke(app, ["audit-attributes", "-d", "digits", "-w", str(ws)])
    assert again.exit_code == 0 and "already stored" in again.output
    # Zero-shot prompts without a CLIP checkpoint, an unknown dataset, nothing to infer: exit 2.
    monkeypatch.setenv("DIFFCURATE_ATTRIBUTES__ZERO_SHOT", '{"g": ["a man", "a woman"]}')
    res = runner.invoke(app, ["audit-attributes", "-d", "digits", "-w", str(ws)])
    assert res.exit_code == 2 and "CLIP checkpoint" in res.output
    monkeypatch.delenv("DIFFCURATE_ATTRIBUTES__ZERO_SHOT")
    res = runner.invoke(app, ["audit-attributes", "-d", "nope", "-w", str(ws)])
    assert res.exit_code == 2 and "unknown dataset 'nope'" in res.output
    config.write_text("[attributes]\nfaces = true\n")
    res = runner.invoke(app, ["audit-attributes", "-d", "digits", "--no-faces", "-w", str(ws)])
    assert res.exit_code == 2 and "nothing to infer" in res.output


@pytest.mark.usefixtures("prefect_harness")
def test_run_prints_the_unit_and_the_generations_audit(tmp_path, digit_files):
    from test_cli import ingested_and_trained

    ws, model = ingested_and_trained(tmp_path, digit_files)
    res = runner.invoke(app, [
        "run", "-d", "digits", "-m", str(model), "--generations", "8", "--max-mem", "100",
        "--audit-attribute", "stroke", "--audit-unit", "samples", "--audit-generations", "6",
        "--min-generation-share", "0.3", "-w", str(ws),
    ])  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    for expected in ("audit unit", "samples (", "distinct images,", "generations audit",
                     "faces", "generations_audit"):  # fmt: skip
        assert expected in res.output, expected
    refused = runner.invoke(app, ["run", "-d", "digits", "-m", str(model), "--audit-unit",
                                  "copies", "-w", str(ws)])  # fmt: skip
    assert refused.exit_code == 2 and "audit_unit" in refused.output
    refused = runner.invoke(app, ["run", "-d", "digits", "-m", str(model),
                                  "--audit-generations", "1", "-w", str(ws)])  # fmt: skip
    assert refused.exit_code == 2 and "--audit-generations takes 0" in refused.output
