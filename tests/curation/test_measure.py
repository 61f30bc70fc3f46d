"""The memorization gate on a latent text-to-image model that reproduces its secrets under
classifier-free guidance behind a blurring decoder (a VAE's reconstruction floor).

The model is built by hand so that what it memorized is known exactly: its UNet is the exact
denoiser of a caption → image training set (``UNet2DConditionModel`` call signature). For a
memorized caption its x0 estimate is ``lam * secret + (1 - lam) * x0_u`` (x0_u: the exact
posterior mean of the training images, the unconditional prediction), so guidance at
``g = 1 / lam`` puts the estimate on the secret itself and DDIM lands on it; its decoder blurs.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.models.autoencoders.vae import DecoderOutput
from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput
from sklearn.datasets import load_digits

from diffcurate.curation.measure import MeasureConfig, measure_model, to_unit
from diffcurate.metrics.mem_calibration import closest_values
from diffcurate.metrics.memorization import (
    MemorizationPolicy,
    relative_distances,
    tiled_l2_distances,
)
from diffcurate.metrics.utility import PixelFeatureConfig
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.reference import SchedulerConfig
from diffcurate.models.sample import generate

LAM = 0.4  # how strongly a memorized caption pulls towards its image without guidance
GUIDED = 1 / LAM
RELATIVE = MemorizationPolicy(metric="relative_tiled_l2")
CONFIG = MeasureConfig(generations=8, generations_per_secret=2, inference_steps=10,
                       guidance_scale=GUIDED, memorization=RELATIVE, kid_subsets=2,
                       kid_subset_size=8, features=PixelFeatureConfig(size=8, dim=16))  # fmt: skip
UNCOND = torch.zeros(1, 2, 4, dtype=torch.float64)  # the empty caption's states


class MemorizingUNet(UNet2DConditionModel):
    """Exact denoiser of ``images`` with captions ``keys`` (see the module docstring)."""

    def memorize(self, images: torch.Tensor, keys: torch.Tensor, alphas: torch.Tensor) -> None:
        self.images, self.keys, self.alphas = images.double(), keys.double(), alphas.double()

    def forward(  # type: ignore[override]
        self, sample: torch.Tensor, timestep: torch.Tensor, encoder_hidden_states: torch.Tensor,
        **_: object,
    ) -> UNet2DConditionOutput:  # fmt: skip
        a = self.alphas[int(timestep)]
        diff = sample[:, None] - a.sqrt() * self.images[None]  # [b, K, C, H, W]
        weights = torch.softmax(-diff.flatten(2).pow(2).sum(2) / (2 * (1 - a)), dim=1)
        x0_u = torch.einsum("bk,kchw->bchw", weights, self.images)
        gap = torch.cdist(encoder_hidden_states.flatten(1), self.keys.flatten(1))  # [b, K]
        nearest, which = gap.min(dim=1)
        memorized = (nearest < 1e-9)[:, None, None, None]
        x0_c = torch.where(memorized, LAM * self.images[which] + (1 - LAM) * x0_u, x0_u)
        return UNet2DConditionOutput(sample=(sample - a.sqrt() * x0_c) / (1 - a).sqrt())


class BlurDecoder(AutoencoderKL):
    """Identity latents decoded with a 3x3 box blur mixed in at ``weight``: a floor."""

    weight = 0.0

    def decode(self, z: torch.Tensor, return_dict: bool = True, generator=None) -> DecoderOutput:  # type: ignore[override]
        box = F.avg_pool2d(F.pad(z, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
        return DecoderOutput(sample=(1 - self.weight) * z + self.weight * box)


def blur(x: torch.Tensor, weight: float) -> torch.Tensor:
    box = F.avg_pool2d(F.pad(x, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    return (1 - weight) * x + weight * box


def build(images: torch.Tensor, keys: torch.Tensor, floor: float) -> DiffusionModel:
    scheduler = SchedulerConfig().build()
    unet = MemorizingUNet(sample_size=8, in_channels=1, out_channels=1, layers_per_block=1,
                          block_out_channels=(4,), down_block_types=("CrossAttnDownBlock2D",),
                          up_block_types=("CrossAttnUpBlock2D",), norm_num_groups=2,
                          cross_attention_dim=4, attention_head_dim=2).double()  # fmt: skip
    unet.memorize(images, keys, scheduler.alphas_cumprod)
    vae = BlurDecoder(in_channels=1, out_channels=1, latent_channels=1,
                      block_out_channels=(2,), norm_num_groups=2, layers_per_block=1,
                      scaling_factor=1.0).double()  # fmt: skip
    vae.weight = floor
    return DiffusionModel(unet=unet, scheduler=scheduler, vae=vae)


@pytest.fixture(scope="module")
def world() -> dict[str, torch.Tensor]:
    """Two secrets (each 3x in the training set), 40 other training digits, 20 held out."""
    raw = load_digits().images / 16.0 * 2 - 1
    pix = torch.from_numpy(raw)[:, None]  # [1797, 1, 8, 8] in [-1, 1]
    gen = torch.Generator().manual_seed(0)
    captions = torch.randn(62, 2, 4, generator=gen, dtype=torch.float64)
    secrets, others, held = pix[[1, 2]], pix[10:50], pix[1000:1020]
    return {
        "secrets": secrets,
        "secret_caps": captions[:2],
        "others": others,
        "other_caps": captions[2:42],
        "held": held,
        "held_caps": captions[42:62],
        # kept training images: the others, then each secret's three copies
        "neighbours": torch.cat([others, secrets.repeat_interleave(3, dim=0)]),
    }


COPIES = [range(40, 43), range(43, 46)]  # neighbour rows that are each secret's copies


def measure(model: DiffusionModel, w: dict[str, torch.Tensor], config: MeasureConfig = CONFIG,
            **kw: object):  # fmt: skip
    return measure_model(model, w["secrets"], ["s1", "s2"], w["held"], config, w["secret_caps"],
                         w["held_caps"], unconditional=UNCOND, neighbours=w["neighbours"],
                         neighbour_copies=COPIES, calibration_images=w["held"],
                         calibration_conditioning=w["held_caps"], **kw)  # fmt: skip


def memorizer(w: dict[str, torch.Tensor], floor: float) -> DiffusionModel:
    train = torch.cat([w["others"], w["secrets"]])
    return build(train, torch.cat([w["other_caps"], w["secret_caps"]]), floor)


def test_relative_rule_sees_secrets_behind_the_floor_where_absolute_tau_reads_zero(world):
    model = memorizer(world, floor=0.4)
    rel = measure(model, world)
    assert rel.mem.mem_percent == 100.0 and rel.guidance_scale == GUIDED
    # Guided generations are the secrets behind the decoder's blur, so the rule's value is the
    # ratio of blur(secret) computed directly.
    copies = to_unit(blur(world["secrets"], 0.4))
    want = relative_distances(copies, to_unit(world["secrets"]), to_unit(world["neighbours"]),
                              RELATIVE, COPIES).diagonal()  # fmt: skip
    got = [s.best_value for s in rel.mem.secrets]
    np.testing.assert_allclose(got, want, atol=1e-5)
    assert max(got) < 0.8 and (rel.mem.alpha, rel.mem.n_neighbours) == (0.5, 50)
    floor = tiled_l2_distances(copies, to_unit(world["secrets"]))
    assert floor.diagonal().min() > 0.08  # above the absolute tau ...
    absolute = CONFIG.model_copy(update={"memorization": MemorizationPolicy(), "rule": "absolute"})
    assert measure(model, world, absolute).mem.mem_percent == 0.0  # ... which reads 0
    # Without the floor the absolute rule sees the same secrets.
    assert measure(memorizer(world, floor=0.0), world, absolute).mem.mem_percent == 100.0
    # Held-out images (unknown captions: the model emits blurred training digits) stay out.
    assert (rel.heldout_images, rel.heldout_false_positives, rel.heldout_fpr) == (20, 0, 0.0)


def test_without_guidance_the_secrets_are_not_reproduced(world):
    model = memorizer(world, floor=0.4)
    plain = measure(model, world, CONFIG.model_copy(update={"guidance_scale": 1.0}))
    guided = measure(model, world)
    for p, g in zip(plain.mem.secrets, guided.mem.secrets, strict=True):
        assert p.best_value > g.best_value + 0.1


def test_a_model_that_never_saw_the_secrets_reads_zero_with_its_heldout_rate(world):
    naive = build(world["others"], world["other_caps"], floor=0.4)
    result = measure(naive, world)
    assert result.mem.mem_percent == 0.0
    assert all(s.best_value > 1.0 for s in result.mem.secrets)
    assert (result.heldout_images, result.heldout_false_positives) == (20, 0)
    assert result.heldout_fpr == 0.0
    # The rate is that of the rule in force: a loose fixed tau counts every held-out image.
    loose = measure(naive, world, tau=10.0)
    assert loose.heldout_fpr == 1.0 and loose.mem.mem_percent == 100.0


def test_calibrated_delta_reports_its_heldout_rate_and_still_sees_the_secrets(world):
    model = memorizer(world, floor=0.4)
    cal = measure(model, world, CONFIG.model_copy(update={"calibrate_fpr": 0.05}))
    assert cal.calibration is not None and cal.calibration.metric == "relative_tiled_l2"
    # Direct computation: the held-out images' ratios to their own guided generations.
    k = CONFIG.generations_per_secret
    gens = generate(model, 40, seed=CONFIG.seed + 2, num_inference_steps=CONFIG.inference_steps,
                    conditioning=world["held_caps"].repeat_interleave(k, dim=0),
                    guidance_scale=GUIDED, unconditional=UNCOND)  # fmt: skip
    owners = np.repeat(np.arange(20), k).tolist()
    closest = closest_values(to_unit(gens), to_unit(world["held"]), RELATIVE, owners,
                             to_unit(world["neighbours"]))  # fmt: skip
    assert cal.calibration.tau == pytest.approx(np.sort(closest)[1])  # m = floor(0.05 * 20) = 1
    assert cal.heldout_fpr == cal.calibration.observed_fpr == 0.05
    assert cal.heldout_false_positives == 1 and cal.mem.threshold == cal.calibration.tau
    assert cal.mem.mem_percent == 100.0


def test_refusals(world):
    model = memorizer(world, floor=0.0)
    w = world
    with pytest.raises(ValueError, match="duplicate secret ids"):
        measure_model(model, w["secrets"], ["s1", "s1"], w["held"], CONFIG, w["secret_caps"],
                      w["held_caps"], unconditional=UNCOND, neighbours=w["neighbours"])  # fmt: skip
    with pytest.raises(ValueError, match="needs `neighbours`"):
        measure_model(model, w["secrets"], ["s1", "s2"], w["held"], CONFIG, w["secret_caps"],
                      w["held_caps"], unconditional=UNCOND)  # fmt: skip
    with pytest.raises(ValueError, match="needs `unconditional`"):
        measure_model(model, w["secrets"], ["s1", "s2"], w["held"], CONFIG, w["secret_caps"],
                      w["held_caps"], neighbours=w["neighbours"])  # fmt: skip
    with pytest.raises(ValueError, match="calibrate_fpr needs calibration images"):
        measure_model(model, w["secrets"], ["s1", "s2"], w["held"],
                      CONFIG.model_copy(update={"calibrate_fpr": 0.1}), w["secret_caps"],
                      w["held_caps"], unconditional=UNCOND, neighbours=w["neighbours"])  # fmt: skip


def test_auto_rule_is_relative_for_latent_models_only(world):
    latent = memorizer(world, floor=0.4)
    pixel = DiffusionModel(unet=latent.unet, scheduler=latent.scheduler)
    auto = MeasureConfig()
    assert auto.policy_for(latent).metric == "relative_tiled_l2"
    assert auto.policy_for(pixel).metric == "tiled_l2"
    l2 = MeasureConfig(memorization=MemorizationPolicy(metric="l2", threshold=0.5))
    assert l2.policy_for(latent).metric == "relative_l2"
    assert l2.policy_for(latent).threshold == 0.5
    forced = MeasureConfig(rule="relative").policy_for(pixel)
    assert forced.metric == "relative_tiled_l2"
    back = CONFIG.model_copy(update={"rule": "absolute"}).policy_for(latent)
    assert back.metric == "tiled_l2"
