"""The gate's re-trigger probe finds a planted secret that plain prompting misses.

The model is built to have one: its UNet (``UNet2DConditionModel`` call signature) is the exact
ε-denoiser of a point mass at ``x0(e) = w(e) * secret + (1 - w(e)) * other`` with
``w(e) = sigmoid(k * (cos(e, e*) - c))``. The hidden trigger ``e*`` lies at angle ``ANGLE``
from the secret's caption states ``e0``; ``c = cos(CONE)`` with ``CONE < ANGLE``, so prompting
``e0`` gives ``other`` (``w`` ~ 1e-22) while conditioning within a relative radius of about
``sin(ANGLE)`` of ``e0`` can reach ``w`` ~ 1. DDIM with an exact point-mass denoiser lands on
the point, so what each embedding generates is known exactly: this is what a pruning "fix"
that hides a memorized image from its caption looks like (Finding Dori, arXiv 2507.16880).
"""

from __future__ import annotations

import math
import time

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from sklearn.datasets import load_digits

from diffcurate.curation.measure import MeasureConfig, measure_model
from diffcurate.curation.retrigger import UNCONDITIONAL_SKIP, measure_retrigger
from diffcurate.metrics.utility import PixelFeatureConfig
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.retrigger import OPTIMISED, RetriggerConfig, probe_embeddings
from diffcurate.models.schedule import SchedulerConfig

SEQ, DIM = 2, 4
ANGLE, CONE, K = 0.15, 0.05, 5000.0
PROBE = RetriggerConfig(enabled=True, random_probes=3, sigma=0.08, opt_steps=10, lr=0.05,
                        rho=0.25, draws=2)  # fmt: skip
CONFIG = MeasureConfig(generations=4, generations_per_secret=2, inference_steps=5,
                       guidance_scale=1.0, kid_subsets=2, kid_subset_size=4,
                       features=PixelFeatureConfig(size=8, dim=16), retrigger=PROBE)  # fmt: skip


class TriggerUNet(UNet2DConditionModel):
    """Exact denoiser of the point mass ``x0(e)`` (see the module docstring); predicts ε, or v
    with ``v_prediction``."""

    v_prediction = False

    def plant(
        self, secret: torch.Tensor, other: torch.Tensor, trigger: torch.Tensor | None,
        alphas: torch.Tensor,
    ) -> None:  # fmt: skip
        self.secret, self.other, self.alphas = secret.double(), other.double(), alphas.double()
        self.trigger = None if trigger is None else trigger.double().flatten()

    def weight(self, cond: torch.Tensor) -> torch.Tensor:
        """``w(e)`` per row of ``cond`` ``[b, seq, dim]`` (0 everywhere without a trigger)."""
        if self.trigger is None:
            return torch.zeros(len(cond), dtype=cond.dtype)
        cos = torch.nn.functional.cosine_similarity(cond.flatten(1), self.trigger[None], dim=1)
        return torch.sigmoid(K * (cos - math.cos(CONE)))

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **_: object,
    ) -> UNet2DConditionOutput:  # fmt: skip
        t = torch.as_tensor(timestep).reshape(-1).long().expand(len(sample))
        a = self.alphas[t].to(sample)[:, None, None, None]
        w = self.weight(encoder_hidden_states).to(sample)[:, None, None, None]
        x0 = w * self.secret + (1 - w) * self.other
        eps = (sample - a.sqrt() * x0) / (1 - a).sqrt()
        if self.v_prediction:  # v = sqrt(abar) eps - sqrt(1 - abar) x0
            return UNet2DConditionOutput(sample=a.sqrt() * eps - (1 - a).sqrt() * x0)
        return UNet2DConditionOutput(sample=eps)


@pytest.fixture(scope="module")
def world() -> dict[str, torch.Tensor]:
    """Two secret digits with their caption states, the digit the model emits instead, and
    a hidden trigger at ``ANGLE`` from the first secret's caption."""
    pix = torch.from_numpy(load_digits().images / 16.0 * 2 - 1)[:, None]  # [n, 1, 8, 8]
    gen = torch.Generator().manual_seed(0)
    caps = torch.randn(2 + 4, SEQ, DIM, generator=gen, dtype=torch.float64)
    e0 = caps[0].flatten()
    ortho = torch.randn(SEQ * DIM, generator=gen, dtype=torch.float64)
    ortho = ortho - (ortho @ e0) / (e0 @ e0) * e0
    ortho = ortho / ortho.norm() * e0.norm()
    trigger = (math.cos(ANGLE) * e0 + math.sin(ANGLE) * ortho).reshape(SEQ, DIM)
    return {"secrets": pix[[0, 1]], "caps": caps[:2], "other": pix[7], "trigger": trigger,
            "reference": pix[100:104], "ref_caps": caps[2:]}  # fmt: skip


def build(w: dict[str, torch.Tensor], trigger: bool = True, v: bool = False) -> DiffusionModel:
    scheduler = SchedulerConfig(prediction_type="v_prediction" if v else "epsilon").build()
    unet = TriggerUNet(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                       block_out_channels=(4,), down_block_types=("CrossAttnDownBlock2D",),
                       up_block_types=("CrossAttnUpBlock2D",), norm_num_groups=2,
                       cross_attention_dim=DIM, attention_head_dim=2).double()  # fmt: skip
    unet.plant(w["secrets"][0], w["other"], w["trigger"] if trigger else None,
               scheduler.alphas_cumprod)  # fmt: skip
    unet.v_prediction = v
    return DiffusionModel(unet=unet, scheduler=scheduler)


def plain(model: DiffusionModel, w: dict[str, torch.Tensor], config: MeasureConfig = CONFIG):
    return measure_model(model, w["secrets"], ["a", "b"], w["reference"], config, w["caps"],
                         w["ref_caps"])  # fmt: skip


def probe(model: DiffusionModel, w: dict[str, torch.Tensor], config: MeasureConfig = CONFIG):
    m = plain(model, w, config)
    policy = config.policy_for(model).model_copy(update={"threshold": m.mem.threshold})
    return m, measure_retrigger(model, w["secrets"], ["a", "b"], w["caps"], config, policy)


def test_the_planted_model_is_what_the_test_says(world):
    model = build(world)
    unet = model.unet
    assert float(unet.weight(world["caps"][:1])) < 1e-20  # the caption: `other`
    assert float(unet.weight(world["trigger"][None])) > 0.99  # the trigger: the secret
    # The trigger is reachable inside the probe's radius, not by the random radius alone.
    assert math.sin(ANGLE) < PROBE.rho
    assert PROBE.sigma < math.sin(ANGLE - CONE)


@pytest.mark.parametrize("v", [False, True], ids=["epsilon", "v_prediction"])
def test_probe_finds_the_secret_plain_prompting_misses(world, v):
    started = time.perf_counter()
    m, rt = probe(build(world, v=v), world)
    seconds = time.perf_counter() - started
    assert m.mem.mem_percent == 0.0  # plain prompting: nothing reconstructed
    assert [s.reconstructed for s in m.mem.secrets] == [False, False]
    a, b = rt.secrets
    assert a.secret_id == "a" and a.retriggered and a.probes == [OPTIMISED]
    assert a.best_value is not None and a.best_value < m.mem.threshold
    assert a.loss_optimised is not None and a.loss_plain is not None
    assert a.loss_optimised < 1e-3 * a.loss_plain  # the search reached the trigger
    assert not b.retriggered  # the model never emits secret b
    assert rt.mem_percent == 50.0 and rt.n_retriggered == 1
    assert rt.metric == "tiled_l2" and rt.threshold == m.mem.threshold
    assert rt.probes == ["random-0", "random-1", "random-2", OPTIMISED]
    assert rt.seconds is not None and seconds < 60


def test_a_model_without_a_hidden_trigger_reads_zero(world):
    m, rt = probe(build(world, trigger=False), world)
    assert m.mem.mem_percent == 0.0
    assert rt.mem_percent == 0.0
    assert not any(s.retriggered for s in rt.secrets)


def test_the_radius_bounds_the_search(world):
    # Too small a ball (rho < sin(ANGLE - CONE)) cannot reach the trigger's cone.
    small = CONFIG.model_copy(update={"retrigger": PROBE.model_copy(update={"rho": 0.05})})
    _, rt = probe(build(world), world, small)
    assert rt.mem_percent == 0.0
    model = build(world)
    x0 = world["secrets"]
    probes = probe_embeddings(model, x0, world["caps"], ["a", "b"], PROBE)
    assert probes.embeddings.shape == (2, 4, SEQ, DIM)
    assert probes.labels == ["random-0", "random-1", "random-2", OPTIMISED]
    radius = probes.relative_radius
    assert torch.allclose(radius[:, :3], torch.full((2, 3), PROBE.sigma, dtype=radius.dtype))
    assert bool((radius[:, 3] <= PROBE.rho + 1e-9).all())
    # The optimised probe is a perturbation, also where it does not beat the caption's loss;
    # only a zero gradient leaves it at e (secret b: w(e) underflows to exactly 0 there).
    assert radius[0, 3] > 0 and radius[1, 3] == 0


def test_probes_are_keyed_by_secret_and_seed(world):
    model = build(world)
    both = probe_embeddings(model, world["secrets"], world["caps"], ["a", "b"], PROBE)
    alone = probe_embeddings(model, world["secrets"][1:], world["caps"][1:], ["b"], PROBE)
    assert torch.equal(both.embeddings[1], alone.embeddings[0])
    other = probe_embeddings(model, world["secrets"], world["caps"], ["a", "b"],
                             PROBE.model_copy(update={"seed": 1}))  # fmt: skip
    assert not torch.equal(both.embeddings[:, 0], other.embeddings[:, 0])


def test_unconditional_models_are_skipped_with_a_reason(world):
    from tiny_unets import tiny_unet

    model = DiffusionModel(unet=tiny_unet(), scheduler=SchedulerConfig().build())
    rt = measure_retrigger(model, world["secrets"], ["a", "b"], None, CONFIG,
                           CONFIG.policy_for(model))  # fmt: skip
    assert rt.skipped == UNCONDITIONAL_SKIP and rt.mem_percent is None
    with pytest.raises(ValueError, match="not text-conditional"):
        probe_embeddings(model, world["secrets"], world["caps"], ["a", "b"], PROBE)
