"""``clip-knn``: CLIP-embedding near duplicates or secret neighbours as a :class:`Scorer`."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field, model_validator

from diffcurate.influence.clip_knn import ClipKNNConfig, clip_knn_risk
from diffcurate.influence.scorers.base import (
    OPTIONS,
    BaseScorer,
    KeyScoreFn,
    Needs,
    RunState,
    Spec,
    default_of,
    needs_state,
)


class ClipKNNOptions(BaseModel):
    """``clip-knn`` options (see :class:`~diffcurate.influence.clip_knn.ClipKNNConfig`).

    ``secrets``: sample ids or keys of the dataset's secret/canary images (modes
    ``secret-max`` and ``secret-knn``).
    """

    model_config = OPTIONS
    mode: Literal["duplicates", "secret-max", "secret-knn"] = default_of(ClipKNNConfig, "mode")
    tau: float = Field(default_of(ClipKNNConfig, "tau"), ge=-1.0, le=1.0)
    k: int = Field(default_of(ClipKNNConfig, "k"), ge=1)
    secrets: tuple[str, ...] = ()

    @model_validator(mode="after")
    def _secrets_for_secret_modes(self) -> ClipKNNOptions:
        if self.mode != "duplicates" and not self.secrets:
            raise ValueError(f"clip-knn mode {self.mode!r} needs secrets (sample ids or keys)")
        return self


class ClipKNNScorer(BaseScorer):
    """Reads the ingest-time CLIP image embeddings; the reference is every dataset sample."""

    name = "clip-knn"
    summary = "CLIP-embedding near duplicates or secret neighbours (needs ingest embeddings)"
    options_model = ClipKNNOptions
    options_key = "clip_knn"
    needs = Needs(model=False, embeddings=True)

    def config(self, spec: Spec) -> ClipKNNConfig:
        opts = spec.options
        return ClipKNNConfig(mode=opts.mode, tau=opts.tau, k=opts.k)

    def secrets(self, spec: Spec) -> tuple[str, ...]:
        return spec.options.secrets

    def score_keys(self, spec: Spec, state: RunState | None) -> KeyScoreFn:
        emb = needs_state(state, "embeddings", self.name).embeddings
        assert emb is not None
        cfg = self.config(spec)

        def score(keys, embeddings=None):  # type: ignore[no-untyped-def]
            if embeddings is None:
                row = {k: i for i, k in enumerate(emb.reference_keys)}
                missing = [k for k in keys if str(k) not in row]
                if missing:
                    raise KeyError(f"no embeddings for samples {missing[:5]}")
                embeddings = emb.reference[[row[str(k)] for k in keys]]
            return clip_knn_risk(
                keys, embeddings, cfg,
                reference_keys=emb.reference_keys, reference_embeddings=emb.reference,
                secrets=emb.secrets,
            )  # fmt: skip

        return score
