"""The DDPM noise schedule every reference model, pipeline and sampler shares.

Its own module so that :mod:`diffcurate.models.reference` (which builds sd-tiny on demand) and
:mod:`diffcurate.models.sd_tiny` both import it without importing each other.
"""

from __future__ import annotations

from typing import Literal

from diffusers import DDPMScheduler
from pydantic import BaseModel, ConfigDict, Field


class SchedulerConfig(BaseModel):
    """The DDPM noise schedule (the forward process every loss and sampler shares).

    Attributes:
        num_train_timesteps: T; training draws t uniformly from ``[0, T)``.
        beta_schedule: diffusers beta schedule name (linear as in Ho et al. 2020).
        beta_start: β_1.
        beta_end: β_T.
        prediction_type: What the network predicts: the noise ε or the velocity v.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_train_timesteps: int = Field(1000, ge=1)
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "linear"
    beta_start: float = Field(1e-4, gt=0)
    beta_end: float = Field(0.02, gt=0, lt=1)
    prediction_type: Literal["epsilon", "v_prediction"] = "epsilon"

    def build(self, clip_sample: bool = True) -> DDPMScheduler:
        """A ``DDPMScheduler`` with this schedule (``clip_sample``: clip predicted x0 to
        [-1, 1] when sampling, right for pixels, wrong for latents)."""
        return DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps,
            beta_schedule=self.beta_schedule,
            beta_start=self.beta_start,
            beta_end=self.beta_end,
            prediction_type=self.prediction_type,
            clip_sample=clip_sample,
        )
