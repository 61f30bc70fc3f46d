"""A latent text-to-image pipeline through the whole loop on the command line.

ingest → score → run (fine-tune on cached latents with captions, gated by guided generation
from each distinct secret's caption) → release approve → eval, with the documented exit codes;
the candidate is a pipeline directory diffusers' ``StableDiffusionPipeline`` loads.
"""

import pytest
import torch
from typer.testing import CliRunner

from diffcurate.cli import app
from diffcurate.curation.gate import GatePolicy
from diffcurate.demo.photos import photo_samples
from diffcurate.demo.writers import write_webdataset
from diffcurate.mitigation import MitigationConfig
from diffcurate.models.diffusion import load_diffusion_model
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger
from tiny_pipelines import save_tiny_sd_pipeline

runner = CliRunner()
pytestmark = pytest.mark.usefixtures("prefect_harness")

GATE = ("--generations", 16, "--generations-per-secret", 2, "--inference-steps", 3,
        "--guidance-scale", 3.0)  # fmt: skip


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


@pytest.fixture(scope="module")
def t2i(tmp_path_factory):
    """Photo crops with two secrets copied 4x, a held-out split, and a tiny SD pipeline."""
    root = tmp_path_factory.mktemp("t2i")
    made = photo_samples(heldout=12, n_train=30, secrets=2, near_secrets=0, copies=4, size=24)
    write_webdataset(made.train, root / "train")
    write_webdataset(made.heldout, root / "heldout")
    ws = root / "ws"
    for src, name in ((root / "train", "photos"), (root / "heldout", "photos-heldout")):
        res = invoke("ingest", src, "-d", name, "-w", ws)
        assert res.exit_code == 0, res.output
    return ws, save_tiny_sd_pipeline(root / "pipe"), made


@pytest.mark.slow  # end to end through the CLI; CI runs it in make test-slow
def test_latent_pipeline_through_ingest_score_run_approve_eval(t2i):
    ws, pipe, made = t2i
    res = invoke("score", "-d", "photos", "-m", pipe, "--scorer", "loss", "-w", ws, "--top", 3)
    assert res.exit_code == 0, res.output
    store = LanceStore(str(ws / "lancedb"))
    n_samples = store.table("samples").count_rows("dataset = 'photos'")
    # The score run encoded every sample once: its latents are cached for the later stages.
    assert store.table("latents").count_rows() == n_samples

    secrets = ",".join(made.exact_keys)
    res = invoke("run", "-d", "photos", "-m", pipe, "--scorer", "loss", "--fraction", 0.05,
                 "--secrets", secrets, "--heldout-dataset", "photos-heldout",
                 "--mitigation", "finetune", "--lr", 1e-4, *GATE, "-w", ws)  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    run = Ledger(ws / "ledger.duckdb").runs(kind="hygiene")[0]
    stats = run.stats
    assert run.status == "completed"
    # Secrets are measured once per distinct image, not once per copy.
    assert stats["secrets"] and len(stats["secrets"]) == 2 and stats["secret_samples"] == 8
    assert stats["mem_rule"] == "relative_tiled_l2" and stats["guidance_scale"] == 3.0
    assert stats["heldout_fpr"]["before"] is not None
    assert stats["geometry"]["n_images"] == stats["n_kept"]
    assert "Mem% rule" in res.output and "held-out false positives" in res.output
    after_fpr = stats["heldout_fpr"]["after"]
    assert f"{100 * after_fpr:.1f}% after mitigation" in " ".join(
        res.output.replace("│", " ").split()
    )
    assert (res.exit_code == 0) == stats["gate_passed"]
    # No latent was encoded twice: the kept samples' latents came from the cache.
    assert store.table("latents").count_rows() == n_samples

    candidate = stats["candidate_model"]
    model = load_diffusion_model(candidate)
    assert model.vae is not None and model.text_encoder is not None and model.conditional
    base = load_diffusion_model(pipe)
    changed = any(not torch.equal(a, b) for a, b in
                  zip(model.unet.parameters(), base.unet.parameters(), strict=True))  # fmt: skip
    assert changed  # the fine-tune moved the UNet ...
    assert all(torch.equal(a, b) for a, b in  # ... and left the frozen VAE alone
               zip(model.vae.parameters(), base.vae.parameters(), strict=True))  # fmt: skip
    from diffusers import StableDiffusionPipeline

    sd = StableDiffusionPipeline.from_pretrained(candidate, local_files_only=True)
    image = sd("a photo", num_inference_steps=2, guidance_scale=2.0, output_type="pt").images
    assert image.shape == (1, 3, 16, 16) and torch.isfinite(image).all()

    tag = stats["release_tag"]
    approve = ["release", "approve", tag, "--actor", "ann", "-c", "reviewed", "-w", ws]
    if not stats["gate_passed"]:
        approve.append("--override")
    res = invoke(*approve)
    assert res.exit_code == 0, res.output
    assert "released as photos-release-1" in res.output

    res = invoke("eval", "-d", "photos", "-m", pipe, "--secrets", secrets, "--scorers", "loss",
                 "--fraction", 0.05, "--heldout-dataset", "photos-heldout", *GATE,
                 "-w", ws)  # fmt: skip
    assert res.exit_code == 0, res.output
    ev = Ledger(ws / "ledger.duckdb").runs(kind="eval")[0].stats
    assert ev["mem_rule"] == "relative_tiled_l2" and len(ev["secrets"]) == 2
    default = MitigationConfig().method  # eval compares the default mitigation unless told
    assert {(r["scorer"], r["mitigation"]) for r in ev["rows"]} == {
        ("original", "-"),
        ("none", default),
        ("loss", default),
    }


def test_sample_takes_prompts_for_text_conditional_models(t2i, tmp_path):
    _, pipe, _ = t2i
    res = invoke("sample", "-m", pipe, "-o", tmp_path / "g.png", "--n", 2)
    assert res.exit_code == 2 and "--prompt" in res.output
    res = invoke("sample", "-m", pipe, "-o", tmp_path / "g.png", "--n", 2, "--prompt",
                 "a photo of a cat", "--inference-steps", 2, "--scale", 1)  # fmt: skip
    assert res.exit_code == 0, res.output
    from PIL import Image

    assert Image.open(tmp_path / "g.png").size == (32, 16)


def test_bad_checkpoints_fail_in_one_line_before_any_flow(t2i, tmp_path):
    ws, pipe, _ = t2i
    res = invoke("run", "-d", "photos", "-m", tmp_path / "nope", "-w", ws)
    assert res.exit_code == 2 and "model not found" in res.output
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    res = invoke("score", "-d", "photos", "-m", single, "--scorer", "loss", "-w", ws)
    assert res.exit_code == 2 and "--model-config" in res.output
    res = invoke("run", "-d", "photos", "-m", pipe, "--dtype", "float16", "-w", ws)
    assert res.exit_code == 2 and "needs --device cuda" in res.output
    assert "Traceback" not in res.output


@pytest.mark.slow  # end to end through the CLI; CI runs it in make test-slow
def test_run_with_the_retrigger_probe_records_its_gate_check(t2i):
    ws, pipe, made = t2i
    res = invoke("run", "-d", "photos", "-m", pipe, "--scorer", "loss", "--fraction", 0.05,
                 "--secrets", ",".join(made.exact_keys), "--heldout-dataset", "photos-heldout",
                 "--mitigation", "finetune", "--lr", 1e-4, *GATE, "--retrigger",
                 "--retrigger-probes", 1, "--retrigger-steps", 2, "--max-retrigger-mem", 100,
                 "-w", ws)  # fmt: skip
    assert res.exit_code in (0, 1), res.output
    ledger = Ledger(ws / "ledger.duckdb")
    run = ledger.runs(kind="hygiene")[0]
    stats = run.stats
    assert run.params["measure"]["retrigger"]["enabled"] is True
    rt = stats["retrigger"]
    assert rt["skipped"] is None and rt["probes"] == ["random-0", "optimised"]
    assert set(rt["per_secret"]) == set(stats["secrets"])
    for phase in ("before", "after"):
        value = stats[phase]["retrigger_mem_percent"]
        assert value == rt["mem_percent"][phase] and 0.0 <= value <= 100.0
        for s in rt["per_secret"].values():
            assert s[phase]["n_generations"] == 2  # 2 probes x 1 generation
            assert s[phase]["loss_optimised"] > 0 and s[phase]["loss_plain"] > 0
    checks = {c["name"]: c for c in ledger.gate_checks(run.run_id)}
    check = checks["memorization_retrigger"]
    assert check["passed"] and check["threshold"] == 100.0
    assert check["value_after"] == stats["after"]["retrigger_mem_percent"]
    assert check["policy_version"] == GatePolicy().version
    assert "re-trigger Mem%" in res.output

    # eval measures it for every row too, with the same options.
    res = invoke("eval", "-d", "photos", "-m", pipe, "--secrets", ",".join(made.exact_keys),
                 "--scorers", "loss", "--fraction", 0.05, "--heldout-dataset", "photos-heldout",
                 *GATE, "--retrigger", "--retrigger-probes", 1, "--retrigger-steps", 1,
                 "-w", ws)  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = ledger.runs(kind="eval")[0].stats["rows"]
    assert len(rows) == 3 and all(0 <= r["retrigger_mem_percent"] <= 100 for r in rows)
    assert "re-t" in res.output  # the column (its header is cut in an 80-column terminal)
