"""Attribute a query image to the training samples that shaped it (``diffcurate attribute``).

Two kinds of scorer answer (:func:`attribution_scorers`):

* sketch scorers (``dmin``, seed 002): the query's gradient sketch against the sketches a
  ``diffcurate score --scorer dmin`` run stored in LanceDB; top-k through the ANN index
  (milliseconds), or a flat scan of every stored sketch with ``exact`` (exact sketch inner
  products). The run must have been made with the same model files (checked by the run
  fingerprint).
* scorers with an ``attribute`` hook (``ekfac``, seeds 001/003; ``trak``/``d-trak``; ``bif``,
  seed 004: Cov = −BIF between query and training losses over the posterior draws): exact pairwise
  influence of every sample of the dataset, streamed shard by shard, against the run's
  dataset-level state (EK-FAC curvature, TRAK kernel, SGLD chains): the same state as
  ``diffcurate score`` with those settings, cached EK-FAC factors and BIF chains included.

The query's (t, ε) draws are keyed by the sha256 of the image file (:func:`query_key`), so the
same file always gets the same draws; DMin's default ``shared`` noise gives every image the same
ε per timestep, so a query identical to a training image has identical sketches.

Not a Prefect flow: a query is interactive and must not pay for an orchestration run; it reads
the ledger and LanceDB and writes nothing.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffcurate.influence.registry import RunState, ScorerSpec, get_scorer, scorers, sketch_function
from diffcurate.models.diffusion import DiffusionModel
from diffcurate.models.images import Geometry, decode_sample, prepare_image
from diffcurate.models.inputs import ModelInputs, encode_pixels
from diffcurate.models.load_options import LoadOptions
from diffcurate.storage.lance_store import LanceStore
from diffcurate.storage.ledger import Ledger, RunRecord
from diffcurate.workspace import Workspace


def attribution_scorers() -> tuple[str, ...]:
    """Registered scorers that answer queries: sketch scorers and those with ``attributes``."""
    return tuple(s.name for s in scorers() if s.output == "sketches" or s.attributes)


class AttributionError(ValueError):
    """The query cannot be answered (no suitable run, wrong model, bad image); message says why."""


@dataclass
class Attribution:
    """The top-k training samples of one query, best first (HIGH score = more influential)."""

    scorer: str
    dataset: str
    run_id: str | None
    mode: str
    sample_ids: list[str]
    scores: np.ndarray
    searched: int
    seconds: float
    rows: list[dict] = field(default_factory=list)


def query_key(data: bytes) -> str:
    """The draw key of a query image: its content hash (same bytes ⇒ same draws)."""
    return "query/" + hashlib.sha256(data).hexdigest()[:16]


def load_query(
    path: Path, model: DiffusionModel, caption: str | None, geometry: Geometry = "center-crop"
) -> tuple[torch.Tensor, str, torch.Tensor | None]:
    """The query image in diffusion space (``[1, C, H, W]`` pixels, or its VAE latent), its
    key, and its caption embedding: prepared exactly as the training samples are."""
    try:
        data = Path(path).read_bytes()
    except OSError as err:
        raise AttributionError(f"cannot read query image {path}: {err}") from err
    inputs = ModelInputs.of(model, geometry)
    pixels = prepare_image(
        decode_sample(data, str(path)), inputs.pixel_channels, inputs.pixel_size, geometry
    )
    x0 = torch.from_numpy(pixels[None])
    if model.vae is not None:
        x0 = encode_pixels(model, x0)
    cond = None
    if model.conditional:
        assert model.text_encoder is not None
        cond = model.text_encoder.encode([caption or ""])
    return x0, query_key(data), cond


def _score_runs(ledger: Ledger, signals: tuple[str, ...]) -> list[RunRecord]:
    return [
        r
        for r in ledger.runs(kind="score")
        if r.status == "completed" and r.params.get("scorer", {}).get("signal") in signals
    ]


def _check_run_model(run: RunRecord, model_path: Path) -> None:
    """Refuse a run made with other model files (its fingerprint would differ)."""
    from diffcurate.flows.score import ScoreParams, run_fingerprint

    params = ScoreParams.model_validate(
        {k: v for k, v in run.params.items() if k != "fingerprint"}
        | {"model": str(model_path), "progress": False}
    )
    if run_fingerprint(params) != run.params.get("fingerprint"):
        raise AttributionError(
            f"run {run.run_id} was made with other model files than {model_path} (or they "
            "changed since): its scores are not comparable; re-run `diffcurate score` with "
            "this model"
        )


def find_run(
    ledger: Ledger,
    scorer: str,
    model_path: Path,
    run_id: str | None,
    dataset: str | None,
) -> RunRecord | None:
    """The run to attribute with: ``run_id`` (checked), else the newest completed run of
    ``scorer`` made with ``model_path`` (and ``dataset``), else None."""
    if run_id is not None:
        try:
            run = ledger.run(run_id)
        except KeyError as err:
            raise AttributionError(str(err)) from err
        signal = run.params.get("scorer", {}).get("signal")
        if run.kind != "score" or run.status != "completed":
            raise AttributionError(f"{run_id} is not a completed score run")
        if signal != scorer:
            raise AttributionError(f"{run_id} is a {signal} run, not {scorer}")
        if dataset is not None and run.dataset != dataset:
            raise AttributionError(f"{run_id} scored {run.dataset!r}, not {dataset!r}")
        _check_run_model(run, model_path)
        return run
    target = model_path.resolve()
    for run in _score_runs(ledger, (scorer,)):
        model = run.params.get("model")
        if model is None or Path(model).resolve() != target:
            continue
        if dataset is not None and run.dataset != dataset:
            continue
        _check_run_model(run, model_path)
        return run
    return None


def _from_sketches(
    store: LanceStore,
    run: RunRecord,
    spec: ScorerSpec,
    model: DiffusionModel,
    query,
    k: int,
    exact: bool,
) -> tuple[list[str], np.ndarray, int]:
    from diffcurate.tasks.score import scoring_objective

    images, key, cond = query
    objective = scoring_objective(spec, model)
    sketch = sketch_function(spec)(objective, model.unet, images, [key], cond)
    table = run.stats.get("sketch_table") or "sketches"
    sketches = store.sketches(table)
    hits = sketches.top_k(sketch.numpy(), k, run.run_id, exact=exact)[0]
    return hits.sample_ids, hits.scores, sketches.count(run.run_id)


def _exact_over_dataset(
    store: LanceStore,
    dataset: str,
    spec: ScorerSpec,
    model: DiffusionModel,
    query,
    k: int,
    cache_dir: Path,
    shard_size: int,
) -> tuple[list[str], np.ndarray, int]:
    """The scorer's exact influence of every dataset sample on the query, shard by shard."""
    from diffcurate.tasks.score import load_images, prepare_scorer, scoring_objective

    images, key, cond = query
    ids = sorted(
        store.read("samples", dataset, columns=["sample_id"]).column("sample_id").to_pylist()
    )
    if not ids:
        raise AttributionError(f"dataset {dataset!r} has no samples")
    state: RunState = prepare_scorer.fn(store, dataset, ids, model, spec, cache_dir)
    objective = scoring_objective(spec, model)
    attribute = spec.scorer.attribute(spec, state, objective, model.unet, images, [key], cond)
    if attribute is None:
        raise AttributionError(f"{spec.signal} does not attribute over a dataset")
    scores = np.empty(len(ids))
    for start in range(0, len(ids), shard_size):
        shard = ids[start : start + shard_size]
        x, c, _ = load_images(store, dataset, shard, model)
        scores[start : start + len(shard)] = attribute(x, shard, c)[0]
    order = sorted(range(len(ids)), key=lambda j: (-scores[j], ids[j]))[:k]
    return [ids[j] for j in order], scores[order], len(ids)


def attribute_image(
    workspace: Path,
    image: Path,
    model_path: Path,
    top_k: int = 10,
    scorer: str = "dmin",
    run_id: str | None = None,
    exact: bool = False,
    dataset: str | None = None,
    caption: str | None = None,
    shard_size: int = 256,
    load: LoadOptions | None = None,
    options: dict | None = None,
) -> Attribution:
    """The ``top_k`` training samples with the largest influence on ``image`` (module doc).

    ``options``: :class:`ScorerSpec` settings (common fields and the scorer's own options) for
    an attribution without a score run; with a run, its stored spec decides.
    """
    from diffcurate.tasks.score import load_model

    if scorer not in attribution_scorers():
        raise AttributionError(
            f"unknown scorer {scorer!r}; use one of {', '.join(attribution_scorers())}"
        )
    if top_k < 1:
        raise AttributionError("--top-k must be >= 1")
    if not model_path.exists():
        raise FileNotFoundError(f"model not found: {model_path}")
    layout = Workspace(workspace)
    store = LanceStore.open(layout)
    ledger = Ledger(layout.ledger_path)
    run = find_run(ledger, scorer, model_path, run_id, dataset)
    if run is not None and load is None:
        load = LoadOptions.model_validate(run.params.get("load") or {})
    model = load_model(model_path, options=load)
    geometry = "center-crop" if run is None else run.params.get("geometry", "center-crop")
    query = load_query(image, model, caption, geometry)
    started = time.perf_counter()
    if get_scorer(scorer).output == "sketches":
        if run is None:
            raise AttributionError(
                f"no completed {scorer} run for model {model_path}"
                + ("" if dataset is None else f" on {dataset!r}")
                + f": run `diffcurate score --scorer {scorer}` first (it stores the sketches)"
            )
        spec = ScorerSpec.model_validate(run.params["scorer"])
        ids, scores, searched = _from_sketches(store, run, spec, model, query, top_k, exact)
        mode = "exact scan of the stored sketches" if exact else "ANN index"
        dataset = run.dataset
    else:
        if run is not None:
            spec = ScorerSpec.model_validate(run.params["scorer"])
            dataset = run.dataset
        elif dataset is None:
            raise AttributionError(
                f"{scorer} attributes over a dataset: pass --dataset (or --run with a "
                f"completed {scorer} score run)"
            )
        else:
            spec = ScorerSpec.from_settings(scorer, options or {})
        ids, scores, searched = _exact_over_dataset(
            store, dataset, spec, model, query, top_k, layout.cache_dir, shard_size
        )
        mode = "exact over the dataset"
    seconds = time.perf_counter() - started
    samples = {
        r["sample_id"]: r
        for r in store.read(
            "samples", columns=["sample_id", "key", "caption"], where={"sample_id": ids}
        ).to_pylist()
    }
    rows = [
        {"sample_id": i, "score": float(s), "key": samples.get(i, {}).get("key", "?"),
         "caption": samples.get(i, {}).get("caption", "")}
        for i, s in zip(ids, scores, strict=True)
    ]  # fmt: skip
    return Attribution(
        scorer=scorer, dataset=dataset, run_id=None if run is None else run.run_id, mode=mode,
        sample_ids=list(ids), scores=np.asarray(scores), searched=searched, seconds=seconds,
        rows=rows,
    )  # fmt: skip
