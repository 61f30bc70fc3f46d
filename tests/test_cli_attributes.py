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
    assert res.exit_code == 2 and "has no samples" in res.output
    config.write_text("[attributes]\nfaces = true\n")
    res = runner.invoke(app, ["audit-attributes", "-d", "digits", "--no-faces", "-w", str(ws)])
    assert res.exit_code == 2 and "nothing to infer" in res.output
