"""Workspace and policy configuration.

Settings come from, highest priority first: explicit arguments (the CLI's ``--workspace``),
environment variables ``DIFFCURATE_*`` (nested with ``__``, e.g. ``DIFFCURATE_CLIP__CHECKPOINT``),
a TOML file (``./diffcurate.toml``, or the path in ``DIFFCURATE_CONFIG``), then defaults.

Everything a run writes lives under one workspace directory so that a workspace can be copied,
archived or deleted as a unit, except the LanceDB tables when ``tables.uri`` puts them in an
object store; :class:`~diffcurate.workspace.Workspace` names its paths and the tables location.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from diffcurate.workspace import Workspace, check_storage_options

CONFIG_ENV_VAR = "DIFFCURATE_CONFIG"
DEFAULT_CONFIG_FILE = "diffcurate.toml"


class ClipSettings(BaseModel):
    """open_clip embedding model, loaded only from local files.

    No weights are downloaded at run time. With ``checkpoint`` unset, embeddings are disabled and
    every command says so: we never pass off randomly initialised weights as CLIP.
    """

    model_config = ConfigDict(extra="forbid")

    model: str = Field("ViT-B-32", description="open_clip architecture name.")
    checkpoint: Path | None = Field(
        None, description="Local open_clip checkpoint file (state dict). Unset: no embeddings."
    )
    architecture_file: Path | None = Field(
        None,
        description=(
            "Optional JSON architecture config for a model open_clip does not know; the model "
            "name must equal the file's stem."
        ),
    )
    device: Literal["auto", "cpu", "cuda"] = "auto"
    batch_size: int = Field(64, ge=1, le=4096)

    @property
    def enabled(self) -> bool:
        return self.checkpoint is not None


class IngestSettings(BaseModel):
    """Validation bounds and dedup thresholds for ingestion."""

    model_config = ConfigDict(extra="forbid")

    batch_size: int = Field(256, ge=1, le=100_000, description="Rows per resumable shard.")
    min_side: int = Field(8, ge=1, description="Smallest accepted image width/height (px).")
    max_side: int = Field(16_384, ge=1, description="Largest accepted image width/height (px).")
    max_pixels: int = Field(
        50_000_000,
        ge=1,
        description=(
            "Decompression-bomb guard: images whose header declares more pixels are refused "
            "before any pixel is decoded."
        ),
    )
    max_caption_chars: int = Field(10_000, ge=1)
    phash_max_distance: int = Field(
        4, ge=0, le=32, description="Hamming distance (of 64 bits) for perceptual near-duplicates."
    )
    clip_dup_threshold: float = Field(
        0.95,
        gt=0.0,
        le=1.0,
        description="CLIP image cosine at or above which images are near-dups.",
    )

    @model_validator(mode="after")
    def _sides_ordered(self) -> IngestSettings:
        if self.min_side > self.max_side:
            raise ValueError(f"min_side ({self.min_side}) exceeds max_side ({self.max_side})")
        return self


class AttributeSettings(BaseModel):
    """Inferred group attributes, for corpora without demographic metadata.

    ``diffcurate audit-attributes`` computes them once per sample and stores them with the model
    that produced them; the hygiene run audits them like metadata columns, and labels its
    generations with the image-based ones (zero-shot and faces). Plain types here (the bottom
    layer); :mod:`diffcurate.metrics.inferred_attributes` validates them.
    """

    model_config = ConfigDict(extra="forbid")

    zero_shot: dict[str, list[str] | dict[str, str | list[str]]] = Field(
        default_factory=dict,
        description=(
            "CLIP zero-shot attributes: name -> prompts (a list: each prompt is a group) or "
            "group -> prompt(s). Needs clip.checkpoint."
        ),
    )
    threshold: float = Field(
        0.6, ge=0.0, lt=1.0,
        description="Smallest best-group probability of a zero-shot label; below: 'uncertain'.",
    )  # fmt: skip
    logit_scale: float = Field(
        100.0, gt=0.0, description="Multiplies CLIP cosines before the softmax (CLIP's own: 100)."
    )
    captions: dict[str, dict[str, str | list[str]]] = Field(
        default_factory=dict,
        description=(
            "Caption-derived attributes: name -> group -> keywords (whole words, any case) or "
            "'re:' regexes."
        ),
    )
    faces: bool = Field(True, description="Count faces with the bundled detector (OpenCV Haar).")


class TablesSettings(BaseModel):
    """Where the LanceDB tables live; the ledger, locks, models and caches stay in the workspace.

    A workspace records its tables location the first time a command runs with it (see
    :mod:`diffcurate.workspace`), so later commands, flows and workers need only the workspace.
    Credentials are refused here: the store's own environment variables carry them.
    """

    model_config = ConfigDict(extra="forbid")

    uri: str | None = Field(
        None,
        description=(
            "LanceDB URI of the tables: s3://bucket/prefix (also gs://, az://) or a directory. "
            "Unset: WORKSPACE/lancedb, or the location the workspace recorded."
        ),
    )
    storage_options: dict[str, str] | None = Field(
        None,
        description=(
            "Lance object-store options, e.g. endpoint, region, allow_http (for an "
            "S3-compatible server). Unset: the recorded ones. Never credentials."
        ),
    )

    @model_validator(mode="after")
    def _no_credentials(self) -> TablesSettings:
        if self.storage_options is not None:
            check_storage_options(self.storage_options)
        return self


class Settings(BaseSettings):
    """All diffcurate settings. Construct with :func:`load_settings`."""

    model_config = SettingsConfigDict(
        env_prefix="DIFFCURATE_",
        env_nested_delimiter="__",
        extra="forbid",
    )

    workspace: Path = Field(Path("workspace"), description="Directory holding all run state.")
    threads: int | None = Field(
        None,
        ge=1,
        description=(
            "torch/OpenMP threads of each diffcurate process (DIFFCURATE_THREADS, --threads). "
            "Unset: an exported OMP_NUM_THREADS, else the CPUs this process may use (affinity "
            "and cgroup quota). Set 1 when other jobs share the cores: OpenMP threads spinning "
            "against another process slow every step."
        ),
    )
    clip: ClipSettings = Field(default_factory=ClipSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    attributes: AttributeSettings = Field(default_factory=AttributeSettings)
    tables: TablesSettings = Field(default_factory=TablesSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        toml_path = Path(os.environ.get(CONFIG_ENV_VAR, DEFAULT_CONFIG_FILE))
        sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
        if toml_path.is_file():
            sources.append(TomlConfigSettingsSource(settings_cls, toml_file=toml_path))
        elif CONFIG_ENV_VAR in os.environ:
            raise FileNotFoundError(f"{CONFIG_ENV_VAR} points to {toml_path}, which does not exist")
        return tuple(sources)

    @property
    def layout(self) -> Workspace:
        """Every path under ``workspace`` and the tables location (see
        :mod:`diffcurate.workspace`)."""
        return Workspace(self.workspace, self.tables.uri, self.tables.storage_options)


def available_cpus() -> int:
    """CPUs this process may use: its affinity mask, capped by a cgroup v2 CPU quota.

    ``os.cpu_count()`` counts the host's cores; a container or a ``taskset`` sees fewer, and
    one torch thread per host core then oversubscribes what the process actually gets.
    """
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        n = os.cpu_count() or 1
    try:
        quota, period = Path("/sys/fs/cgroup/cpu.max").read_text().split()[:2]
        if quota != "max":
            n = min(n, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    return max(1, n)


def resolve_threads(threads: int | None) -> int:
    """The torch/OpenMP thread count to use: ``threads`` when set, else an ``OMP_NUM_THREADS``
    the caller exported, else :func:`available_cpus`."""
    if threads is not None:
        return threads
    try:
        return max(1, int(os.environ["OMP_NUM_THREADS"]))
    except (KeyError, ValueError):
        return available_cpus()


def apply_threads(threads: int | None) -> int:
    """Pin torch's intra-op and OpenMP threads to :func:`resolve_threads` of ``threads``.

    The environment variables reach subprocesses (Dask workers, a torch imported later); a
    torch already imported is set directly, which Prefect's task threads share. Returns the
    count applied.
    """
    n = resolve_threads(threads)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(n)
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(n)
    return n


def load_settings(workspace: Path | None = None) -> Settings:
    """Load settings from arguments, environment and TOML; ``workspace`` overrides all."""
    overrides = {} if workspace is None else {"workspace": workspace}
    return Settings(**overrides)
