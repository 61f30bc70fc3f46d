"""Re-trigger Mem%: probe generations judged by the plain Mem% rule, per secret and probe."""

from __future__ import annotations

import numpy as np
import pytest

from diffcurate.metrics.memorization import MemorizationPolicy, mem_percent
from diffcurate.metrics.retrigger import RetriggerResult, retrigger_percent

ABSOLUTE = MemorizationPolicy(metric="tiled_l2", threshold=0.08)


@pytest.fixture
def images() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    secrets = rng.random((2, 8, 8))
    return {"secrets": secrets, "noise": rng.random((4, 8, 8))}


def test_a_secret_counts_when_any_of_its_probes_reconstructs_it(images):
    s, noise = images["secrets"], images["noise"]
    # Secret 0: probe "optimised" reproduces it; secret 1: only noise from both probes.
    gens = np.stack([noise[0], s[0] + 0.01, noise[1], noise[2]]).clip(0, 1)
    result = retrigger_percent(
        gens, s, secret_ids=["a", "b"], generated_for=["a", "a", "b", "b"],
        probe_of=["random-0", "optimised", "random-0", "optimised"], policy=ABSOLUTE,
        loss_plain=[0.5, 0.4], loss_optimised=[0.01, 0.3],
    )  # fmt: skip
    assert result.mem_percent == 50.0 and result.n_retriggered == 1 and result.n_secrets == 2
    a, b = result.secrets
    assert a.retriggered and a.probes == ["optimised"] and a.best_probe == "optimised"
    assert a.best_value == pytest.approx(0.01) and a.n_generations == 2
    assert (a.loss_plain, a.loss_optimised) == (0.5, 0.01)
    assert not b.retriggered and b.probes == [] and b.best_value > 0.08
    assert result.probes == ["random-0", "optimised"]
    assert (result.metric, result.threshold, result.skipped) == ("tiled_l2", 0.08, None)


def test_a_generation_counts_only_for_the_secret_it_was_probed_from(images):
    s = images["secrets"]
    # An exact copy of secret "a", probed from "b"'s caption: neither secret is re-triggered.
    result = retrigger_percent(s[:1], s, secret_ids=["a", "b"], generated_for=["b"],
                               probe_of=["random-0"], policy=ABSOLUTE)  # fmt: skip
    assert result.mem_percent == 0.0
    assert result.secrets[0].n_generations == 0 and result.secrets[0].best_value is None


def test_same_verdicts_as_plain_mem_percent_under_the_relative_rule(images):
    rng = np.random.default_rng(1)
    s = images["secrets"]
    neighbours = rng.random((20, 8, 8))
    gens = np.stack([(s[0] * 0.9 + 0.05), rng.random((8, 8)), s[1], rng.random((8, 8))])
    owners = ["a", "a", "b", "b"]
    policy = MemorizationPolicy(metric="relative_tiled_l2")
    plain = mem_percent(gens, s, policy=policy, secret_ids=["a", "b"], generated_for=owners,
                        neighbours=neighbours)  # fmt: skip
    probed = retrigger_percent(gens, s, secret_ids=["a", "b"], generated_for=owners,
                               probe_of=["r", "o", "r", "o"], policy=policy,
                               neighbours=neighbours)  # fmt: skip
    assert [m.reconstructed for m in plain.secrets] == [d.retriggered for d in probed.secrets]
    assert [m.best_value for m in plain.secrets] == [d.best_value for d in probed.secrets]
    assert probed.mem_percent == plain.mem_percent


def test_skipped_results_have_no_percent_and_bad_inputs_are_refused(images):
    skipped = RetriggerResult(skipped="unconditional model: no caption embedding to perturb")
    assert skipped.mem_percent is None
    assert skipped.model_dump()["mem_percent"] is None
    s = images["secrets"]
    with pytest.raises(ValueError, match="owners"):
        retrigger_percent(s, s, secret_ids=["a", "b"], generated_for=["a"],
                          probe_of=["r", "r"], policy=ABSOLUTE)  # fmt: skip
    with pytest.raises(ValueError, match="unknown secrets"):
        retrigger_percent(s, s, secret_ids=["a", "b"], generated_for=["a", "c"],
                          probe_of=["r", "r"], policy=ABSOLUTE)  # fmt: skip
    with pytest.raises(ValueError, match="unique"):
        retrigger_percent(s, s, secret_ids=["a", "a"], generated_for=["a", "a"],
                          probe_of=["r", "r"], policy=ABSOLUTE)  # fmt: skip
