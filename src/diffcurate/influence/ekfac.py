"""EK-FAC influence for diffusion models (seeds 001/003), on kronfluence.

What is computed
----------------
For a training sample ``x_n`` and a query ``q`` the score is

    score(q, n) = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(x_n),

with ``G`` the EK-FAC approximation of ``GGN^model`` of the mean training loss, ``λ`` the damping
(default 1e-8, seed 001 §4 after Bae et al. 2024: "any sufficiently small value works"),
``ℓ(x_n)`` the sample's diffusion loss and ``m(q)`` the *measurement*, here the diffusion loss of
the query (seed 001 §3.3 "Loss"). A positive score means removing ``x_n`` is predicted to raise
the query's loss, by about ``score / N`` (kronfluence's convention: no 1/N factor). Self-influence
``score(n, n) = ∇ℓ(x_n)ᵀ (G + λI)⁻¹ ∇ℓ(x_n) ≥ 0`` is the risk signal (high = risky).

Losses and draws (common random numbers). Both ``ℓ`` and ``m`` are the objective's per-sample loss
``(1/K) Σ_j mean_D (f(x_t^{(j)}) - y^{(j)})²`` on the sample's own keyed (t, ε) draws
(:meth:`DiffusionObjective.prepare`), so the training gradient of ``x_n`` uses ``x_n``'s draws,
the query gradient uses the query key's draws, and a query that has a training sample's key gets
exactly that sample's draws (the pairwise diagonal then equals the self-influence). Nothing
depends on batch composition.

Curvature. ``G = (1/(N K)) Σ_{n,j} J_{nj}ᵀ (2/D) J_{nj}`` (the output Hessian of
``mean_D (f - y)²`` is ``(2/D) I``; it does not depend on the targets, seed 001 eq. 9). EK-FAC
needs pseudo-gradients ``g = Jᵀ v`` whose second moment is that GGN, i.e. ``E[v vᵀ] = (2/D) I``.
The adapter feeds them to kronfluence as the loss ``mean_D (f - y_mod)²`` with a stop-gradient
pseudo-target ``y_mod = f - (D/2) v``:

* ``fisher="mc"`` (the seeds' method): ``v = sqrt(2/D) z``, ``z ~ N(0, I)``, i.e. targets sampled
  from the model's output distribution ``y_mod ~ N(f, (D/2) I)`` (seed 001 eq. 10 with its
  ``ε_mod ~ N(ε_θ, I)`` rescaled to our mean-over-elements loss normalisation, so that the MC
  Fisher is unbiased for ``G`` rather than ``2G``). ``fisher_samples`` draws per (sample, draw)
  item, each keyed by (config seed, sample key, draw, index) like every other random number here.
* ``fisher="exact"``: the D output basis directions ``v_k = sqrt(2) e_k`` (mean over k of
  ``v vᵀ`` is exactly ``(2/D) I``; "KFLR"-style). Costs D backward passes per item: for tiny
  models and for verification; it makes EK-FAC equal the damped GGN wherever K-FAC is exact.

Damping. 1e-8 presumes many more (sample, draw) outputs than parameters. Where that fails the
pairwise scores are dominated by near-null GGN directions that any layer-wise curvature
treats differently from the dense GGN. Measured on the 189-parameter tiny MLP with 24 images
× 2 draws (``tests/influence/test_ekfac.py``), Spearman of EK-FAC vs the dense damped GGN:
self-influence 0.92 at 1e-8 and 0.94 at λ = 0.1 × mean eigenvalue; pairwise 0.45 at 1e-8
and 0.84 at the larger λ (0.87 and 0.965 vs the layer-block-diagonal dense GGN). So risk
rankings are robust to λ; for attribution on small sets use ``damping=None`` (per-layer
heuristic) or a λ near 0.1 × the mean eigenvalue.

Tracked layers: every ``nn.Linear`` and ``nn.Conv2d`` (incl. attention projections), as in seed
001 §G ("ignoring the parameters in the normalisation layers"); ``modules`` restricts them.

Why kronfluence, and what we added
----------------------------------
kronfluence (Bae et al.) already implements what the seeds need at scale: EK-FAC factors
(activation / pseudo-gradient covariances, eigendecomposition, eigenvalue correction from true
per-example gradients), the *expand* variant for weight sharing (``TrackedConv2d`` unfolds patches
and treats every spatial location, and ``TrackedLinear`` every token, as an extra batch row:
that is K-FAC-expand / Grosse & Martens 2016, the variant seed 001 uses), the MC Fisher through
``Task.compute_train_loss(sample=True)``, damping added to the corrected eigenvalues (default
1e-8, the seeds' value), query batching, factor persistence, and chunked streaming over a
dataset. Re-implementing that is where bugs would live. Our adapter (``_DiffusionTask``) supplies
the diffusion loss, the keyed draws and the GGN pseudo-targets above. What kronfluence lacks,
and what we added minimally:

1. Several (t, ε) draws per sample. kronfluence's per-example gradient is per batch row, so K
   draws as K rows would give per-draw gradients, and the self-influence of the *mean* gradient
   is not the mean of per-draw self-influences. We run K forward passes per batch (one per draw)
   with ``has_shared_parameters=True``, which makes kronfluence sum each example's gradient over
   the passes. Factors are fitted on single-draw items, so the eigenvalue correction averages
   per-item pseudo-gradient squares, the EK-FAC of ``G`` above.
2. A kronfluence 1.0.1 bug: with ``has_shared_parameters=True`` the pairwise tracker's fast path
   *assigns* each pass's score instead of adding it, keeping only the last draw. Setting
   ``enable_post_process_per_sample_gradient`` (identity post-processing) routes it through
   the per-example-gradient path, which adds. Tests check pairwise against dense references
   with K > 1.
3. int8 compression of preconditioned query gradients (seed 001 App. C). kronfluence offers only
   SVD low-rank compression, which the seed found worse for diffusion. We round each
   preconditioned query gradient to int8 with a symmetric absmax scale per (query, layer,
   output unit) (:func:`quantize_int8`), by wrapping the precondition tracker of every tracked
   layer of our own model copy (an instance attribute; private kronfluence API, checked at run
   time). kronfluence multiplies in floating point, so the codes are de-quantised right away:
   this reproduces the numerical effect; keeping the int8 codes (about 4× less memory than
   float32) is for a query store outside kronfluence.
4. kronfluence's ``State`` is a process-wide singleton whose device is fixed by the first
   ``Analyzer``; we reset it when a call asks for another device.
5. Factors are cached under ``factors_dir`` by a fingerprint of model weights, training data and
   keys, objective (seed, schedule, scheduler) and the factor settings, so risk and attribution
   calls on the same training set fit them once, and a changed input never reuses stale factors.

Cost: factor fitting is two passes over ``N·K·fisher_samples`` items (``N·K·D`` for ``exact``),
plus an eigendecomposition per layer; attribution is one pass over the training set per query
batch (``query_batch_size`` queries preconditioned together).
"""

from __future__ import annotations

import copy
import logging
import math
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

import kronfluence
import numpy as np
import torch
import torch.nn.functional as F
from kronfluence.analyzer import Analyzer, prepare_model
from kronfluence.arguments import FactorArguments, ScoreArguments
from kronfluence.factor.eigen import lambda_matrices_exist
from kronfluence.module.tracked_module import ModuleMode, TrackedModule
from kronfluence.task import Task
from kronfluence.utils.constants import ALL_MODULE_NAME, PRECONDITIONED_GRADIENT_NAME
from kronfluence.utils.dataset import DataLoaderKwargs
from kronfluence.utils.state import State
from pydantic import BaseModel, ConfigDict, Field
from torch.utils.data import Dataset

from diffcurate.digests import content_digest
from diffcurate.influence.objective import (
    DTYPES,
    DiffusionObjective,
    DrawBatch,
    SampleKey,
    ScoreResult,
    keyed_generator,
    resolve_device,
    scoring_mode,
)

log = logging.getLogger(__name__)

FISHER_STREAM = "ekfac-fisher"
"""Stream name of the MC pseudo-target draws in :func:`keyed_generator` (one per draw index)."""


class EKFACConfig(BaseModel):
    """Configuration of the EK-FAC influence scorer.

    Attributes:
        damping: λ added to the EK-FAC eigenvalues of the *mean* GGN before inversion
            (absolute, as in seeds 001/003 and kronfluence; default 1e-8). None: kronfluence's
            heuristic, per layer 0.1 × the mean corrected eigenvalue (see "Damping" above).
        fisher: ``"mc"`` (MC-sampled targets, the seeds' method) or ``"exact"`` (output basis
            directions; exact GGN^model, D backward passes per item: tiny models / tests).
        fisher_samples: MC target draws per (sample, draw) item (``"mc"`` only).
        seed: Seed of the MC target draws (the (t, ε) seed lives in the objective).
        dtype: Working precision of forward/backward passes, factors and scores.
        device: ``"cpu"`` or ``"cuda"``.
        train_batch_size: Rows per batch: samples for training gradients, (sample, draw,
            direction) rows for factor fitting.
        query_batch_size: Queries whose preconditioned gradients are kept together while one
            pass over the training set scores them (query batching).
        int8_query: Round preconditioned query gradients to int8 (seed 001 App. C; default on,
            as in the seed). Self-influence never uses it.
        modules: Names of the ``nn.Linear``/``nn.Conv2d`` modules to track; None = all of them.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    damping: float | None = Field(1e-8, ge=0.0)
    fisher: Literal["mc", "exact"] = "mc"
    fisher_samples: int = Field(1, ge=1)
    seed: int = 0
    dtype: Literal["float32", "float64"] = "float32"
    device: Literal["cpu", "cuda"] = "cpu"
    train_batch_size: int = Field(32, ge=1)
    query_batch_size: int = Field(16, ge=1)
    int8_query: bool = True
    modules: tuple[str, ...] | None = None


# ----------------------------------------------------------------------------- int8 codes
def quantize_int8(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric absmax int8 codes of ``x`` with one scale per row of the last dimension.

    For a preconditioned query gradient ``[queries, out, in]`` of one layer that is one scale per
    (query, layer, output unit): finer than one per (query, layer), because at small damping a
    few near-null directions carry most of the magnitude and a single absmax would round the
    rest to zero (measured on the tiny MLP at λ = 1e-8: 11.6% relative score error per
    (query, layer), 5.8% per row). Overhead: one float per ``in`` codes.

    Returns:
        ``(codes, scale)``: int8 codes in [-127, 127] of ``x``'s shape, and scales of shape
        ``[..., 1]`` such that ``codes * scale`` approximates ``x`` within ``scale / 2``.
    """
    absmax = x.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(absmax > 0, absmax / 127.0, torch.ones_like(absmax))
    codes = torch.round(x / scale).clamp_(-127, 127).to(torch.int8)
    return codes, scale


def dequantize_int8(codes: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Inverse of :func:`quantize_int8` (up to rounding)."""
    return codes.to(dtype) * scale.to(dtype)


def _install_int8_query_compression(model: torch.nn.Module) -> int:
    """Round every tracked layer's preconditioned query gradient to int8 (see module docstring).

    Wraps ``_process_preconditioned_gradient`` of the PRECONDITION_GRADIENT tracker of each
    tracked layer *instance* of our private model copy; kronfluence itself is not modified.
    """
    wrapped = 0
    for module in model.modules():
        if not isinstance(module, TrackedModule):
            continue
        tracker = getattr(module, "_trackers", {}).get(ModuleMode.PRECONDITION_GRADIENT)
        process = getattr(tracker, "_process_preconditioned_gradient", None)
        if process is None:
            raise RuntimeError(
                f"kronfluence {kronfluence.__version__}: the precondition tracker has no "
                "`_process_preconditioned_gradient`; int8 query compression needs updating "
                "(or set int8_query=False)"
            )

        def process_int8(
            preconditioned_gradient: torch.Tensor, _process: Any = process, _module: Any = module
        ) -> None:
            _process(preconditioned_gradient=preconditioned_gradient)
            stored = _module.storage[PRECONDITIONED_GRADIENT_NAME]
            if isinstance(stored, torch.Tensor):
                codes, scale = quantize_int8(stored)
                _module.storage[PRECONDITIONED_GRADIENT_NAME] = dequantize_int8(
                    codes, scale, stored.dtype
                )

        tracker._process_preconditioned_gradient = process_int8  # type: ignore[union-attr]
        wrapped += 1
    return wrapped


# ------------------------------------------------------------------------------ datasets
def fisher_directions(
    config: EKFACConfig, key: SampleKey, draw: int, shape: Sequence[int]
) -> torch.Tensor:
    """The output-space directions ``v`` of one (sample, draw) item: ``[V, *shape]`` float64.

    ``mc``: ``fisher_samples`` draws ``sqrt(2/D) z`` with z keyed by ``(config.seed, key,
    "ekfac-fisher/<draw>", index)`` (so the first M of M' > M draws coincide). ``exact``: the D
    basis directions ``sqrt(2) e_k``. Either way the mean of ``v vᵀ`` over the V directions is (or
    is unbiased for) ``(2/D) I``, the output Hessian of ``mean_D (f - y)²``.
    """
    shape = tuple(int(s) for s in shape)
    dim = math.prod(shape)
    if config.fisher == "exact":
        return (math.sqrt(2.0) * torch.eye(dim, dtype=torch.float64)).reshape(dim, *shape)
    rows = [
        torch.randn(
            shape,
            generator=keyed_generator(config.seed, key, f"{FISHER_STREAM}/{int(draw)}", m),
            dtype=torch.float64,
        )
        for m in range(config.fisher_samples)
    ]
    return math.sqrt(2.0 / dim) * torch.stack(rows)


class _SampleDataset(Dataset):
    """One row per sample, its K draws stacked: ``x_t [K, ...]``, ``t [K]``, ``target [K, ...]``."""

    def __init__(self, batch: DrawBatch) -> None:
        n, k = batch.n_samples, batch.n_draws
        self.x_t = batch.x_t.detach().cpu().reshape(n, k, *batch.x_t.shape[1:])
        self.t = batch.t.cpu().reshape(n, k)
        self.target = batch.target.detach().cpu().reshape(n, k, *batch.target.shape[1:])
        self.cond = None
        if batch.cond is not None:
            self.cond = batch.cond.detach().cpu().reshape(n, k, *batch.cond.shape[1:])

    def __len__(self) -> int:
        return self.x_t.shape[0]

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        row = {"x_t": self.x_t[i], "t": self.t[i], "target": self.target[i]}
        if self.cond is not None:
            row["cond"] = self.cond[i]
        return row


class _FisherDataset(Dataset):
    """One row per (item, direction): single-draw items with their GGN direction ``v``.

    Directions are generated lazily (keyed, so independent of batching) to keep memory at the
    size of the item set, not items × directions.
    """

    def __init__(self, batch: DrawBatch, config: EKFACConfig) -> None:
        self.x_t = batch.x_t.detach().cpu()
        self.t = batch.t.cpu()
        self.cond = None if batch.cond is None else batch.cond.detach().cpu()
        self.keys = batch.item_keys
        self.draws = batch.item_draws
        self.config = config
        self.n_dirs = config.fisher_samples if config.fisher == "mc" else self.x_t[0].numel()
        self._cache: tuple[int, torch.Tensor] | None = None

    def __len__(self) -> int:
        return len(self.keys) * self.n_dirs

    def __getitem__(self, e: int) -> dict[str, torch.Tensor]:
        item, d = divmod(e, self.n_dirs)
        if self._cache is None or self._cache[0] != item:
            dirs = fisher_directions(
                self.config, self.keys[item], self.draws[item], self.x_t.shape[1:]
            )
            self._cache = (item, dirs.to(self.x_t.dtype))
        row = {
            "x_t": self.x_t[item][None],
            "t": self.t[item][None],
            "v": self._cache[1][d][None],
        }
        if self.cond is not None:
            row["cond"] = self.cond[item][None]
        return row


# ------------------------------------------------------------------------- kronfluence task
class _DiffusionTask(Task):
    """kronfluence adapter for the diffusion loss (internal; users see :class:`DiffusionObjective`).

    A batch holds ``x_t [b, K, ...]``, ``t [b, K]`` and either ``target [b, K, ...]`` (real
    targets) or ``v [b, K, ...]`` (GGN directions, factor fitting only). The loss is the SUM over
    rows of the per-row loss ``(1/K) Σ_j mean_D (f_j - y_j)²``, one forward pass per draw j.
    """

    # Identity post-processing; routes pairwise scores through kronfluence's accumulating path
    # (module docstring, point 2).
    enable_post_process_per_sample_gradient = True

    def __init__(self, objective: DiffusionObjective, modules: Sequence[str] | None) -> None:
        self.objective = objective
        self.modules = None if modules is None else list(modules)

    def compute_train_loss(
        self, batch: dict[str, torch.Tensor], model: torch.nn.Module, sample: bool = False
    ) -> torch.Tensor:
        x_t = batch["x_t"]
        n_draws = x_t.shape[1]
        dim = x_t[0, 0].numel()
        cond = batch.get("cond")
        total = x_t.new_zeros(())
        for j in range(n_draws):
            c = None if cond is None else cond[:, j]
            out = self.objective.model_output(model, x_t[:, j], batch["t"][:, j], c)
            if sample:
                if "v" not in batch:
                    raise ValueError("sampled (Fisher) losses need GGN directions `v` in the batch")
                target = out.detach() - (dim / 2.0) * batch["v"][:, j]
            else:
                target = batch["target"][:, j]
            err = F.mse_loss(out, target, reduction="none").flatten(1).mean(dim=1)
            total = total + err.sum() / n_draws
        return total

    def compute_measurement(
        self, batch: dict[str, torch.Tensor], model: torch.nn.Module
    ) -> torch.Tensor:
        return self.compute_train_loss(batch, model, sample=False)

    def get_influence_tracked_modules(self) -> list[str] | None:
        return self.modules

    def post_process_per_sample_gradient(
        self, module_name: str, gradient: torch.Tensor
    ) -> torch.Tensor:
        del module_name
        return gradient


# --------------------------------------------------------------------------- plumbing
def _fingerprint(*parts: object) -> str:
    """:func:`~diffcurate.digests.content_digest` with a draw batch spelled out as its tensors
    and sample keys."""
    flat: list[object] = []
    for part in parts:
        if isinstance(part, DrawBatch):
            flat += [t for t in (part.x_t, part.t, part.target, part.cond) if t is not None]
            flat.append([str(k) for k in part.sample_keys])
        else:
            flat.append(part)
    return content_digest(*flat, length=20)


def _objective_id(objective: DiffusionObjective) -> dict[str, Any]:
    return {
        "seed": objective.seed,
        "schedule": objective.schedule.model_dump(),
        "scheduler": dict(objective.scheduler.config),
        "vae": objective.vae is not None,
    }


def _state_for(device: torch.device) -> None:
    """Point kronfluence's process-wide ``State`` singleton at ``device`` (docstring, point 4)."""
    state = State(cpu=device.type == "cpu")
    if state.device.type != device.type:
        State._reset_state()
        state = State(cpu=device.type == "cpu")
    if state.device.type != device.type:
        raise RuntimeError(f"kronfluence runs on {state.device}, but {device} was requested")


@contextmanager
def _quiet() -> Iterator[None]:
    """Silence kronfluence's FutureWarnings about ``torch.cuda.amp.GradScaler`` (AMP is off)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=".*GradScaler.*")
        yield


@contextmanager
def _factors_root(factors_dir: str | Path | None) -> Iterator[Path]:
    if factors_dir is not None:
        path = Path(factors_dir)
        path.mkdir(parents=True, exist_ok=True)
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="diffcurate-ekfac-") as tmp:
        yield Path(tmp)


class _Session:
    """A prepared model copy, its kronfluence Analyzer and the factors of one curvature set."""

    def __init__(
        self,
        objective: DiffusionObjective,
        model: torch.nn.Module,
        fit_images: torch.Tensor,
        fit_keys: Sequence[SampleKey],
        config: EKFACConfig,
        root: Path,
        fit_cond: torch.Tensor | None,
    ) -> None:
        self.objective, self.config = objective, config
        self.device, self.dtype = resolve_device(config.device), DTYPES[config.dtype]
        _state_for(self.device)
        _check_images(fit_images, fit_keys, "curvature")
        self.fit_batch = self.prepare(fit_images, fit_keys, fit_cond)
        self.factors_name = "factors_" + _fingerprint(
            model,
            self.fit_batch,
            _objective_id(objective),
            config.model_dump(include={"fisher", "fisher_samples", "seed", "dtype", "modules"}),
            kronfluence.__version__,
        )
        self.task = _DiffusionTask(objective, config.modules)
        # prepare_model wraps layers in place and freezes parameters: always work on a copy.
        net = copy.deepcopy(model)
        first = next(net.parameters(), None)
        if first is not None and (first.dtype, first.device) != (self.dtype, self.device):
            net = net.to(device=self.device, dtype=self.dtype)
        self.model = prepare_model(net, self.task)
        if config.int8_query:
            _install_int8_query_compression(self.model)
        self.analyzer = Analyzer(
            analysis_name="ekfac",
            model=self.model,
            task=self.task,
            cpu=self.device.type == "cpu",
            log_level=logging.WARNING,
            disable_tqdm=True,
            output_dir=str(root),
        )
        self.analyzer.set_dataloader_kwargs(DataLoaderKwargs(num_workers=0))
        self.layer_names = tuple(
            m.name for m in self.model.modules() if isinstance(m, TrackedModule)
        )

    def prepare(
        self, images: torch.Tensor, keys: Sequence[SampleKey], cond: torch.Tensor | None
    ) -> DrawBatch:
        """The keyed draws of ``images`` in the working dtype/device (unique keys required)."""
        keys = list(keys)
        if len(set(map(str, keys))) != len(keys):
            raise ValueError("sample keys must be unique (draws are keyed by them)")
        with torch.no_grad():
            batch = self.objective.prepare(images, keys, self.dtype, self.device, cond)
        for name in ("x_t", "target"):
            if not torch.isfinite(getattr(batch, name)).all():
                raise FloatingPointError(f"non-finite {name} for the given images")
        return batch

    def fit(self) -> None:
        """Fit (or reuse the cached) EK-FAC factors of the curvature set."""
        dt = self.dtype
        factor_args = FactorArguments(
            strategy="ekfac",
            use_empirical_fisher=False,
            has_shared_parameters=True,
            covariance_max_examples=None,
            lambda_max_examples=None,
            activation_covariance_dtype=dt,
            gradient_covariance_dtype=dt,
            per_sample_gradient_dtype=dt,
            lambda_dtype=dt,
            eigendecomposition_dtype=torch.float64,
        )
        dataset = _FisherDataset(self.fit_batch, self.config)
        out_dir = self.analyzer.factors_output_dir(self.factors_name)
        if lambda_matrices_exist(output_dir=out_dir):
            log.info("EK-FAC: reusing factors %s", out_dir)
        else:
            log.info("EK-FAC: fitting factors on %d rows into %s", len(dataset), out_dir)
        with scoring_mode(self.model), _quiet():
            self.analyzer.fit_all_factors(
                factors_name=self.factors_name,
                dataset=dataset,
                per_device_batch_size=self.config.train_batch_size,
                factor_args=factor_args,
            )

    def score_args(self, per_module: bool) -> ScoreArguments:
        dt = self.dtype
        return ScoreArguments(
            damping_factor=self.config.damping,
            compute_per_module_scores=per_module,
            per_sample_gradient_dtype=dt,
            precondition_dtype=dt,
            score_dtype=dt,
            query_gradient_svd_dtype=dt,
        )


def _check_images(images: torch.Tensor, keys: Sequence[SampleKey], what: str) -> None:
    if images.shape[0] == 0:
        raise ValueError(f"no {what} images")
    if images.shape[0] != len(keys):
        raise ValueError(f"{images.shape[0]} {what} images but {len(keys)} keys")


def _fit_set(
    images: torch.Tensor,
    keys: Sequence[SampleKey],
    cond: torch.Tensor | None,
    fit_images: torch.Tensor | None,
    fit_keys: Sequence[SampleKey] | None,
    fit_cond: torch.Tensor | None,
) -> tuple[torch.Tensor, Sequence[SampleKey], torch.Tensor | None]:
    """The curvature set: ``fit_*`` when given, else the scored set itself."""
    if fit_images is None:
        if fit_keys is not None or fit_cond is not None:
            raise ValueError("fit_keys/fit_cond given without fit_images")
        return images, keys, cond
    if fit_keys is None:
        raise ValueError("fit_images needs fit_keys")
    return fit_images, fit_keys, fit_cond


# ------------------------------------------------------------------------------ public API
def ekfac_attribution(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    train_images: torch.Tensor,
    train_keys: Sequence[SampleKey],
    query_images: torch.Tensor,
    query_keys: Sequence[SampleKey],
    config: EKFACConfig | None = None,
    factors_dir: str | Path | None = None,
    train_cond: torch.Tensor | None = None,
    query_cond: torch.Tensor | None = None,
    *,
    fit_images: torch.Tensor | None = None,
    fit_keys: Sequence[SampleKey] | None = None,
    fit_cond: torch.Tensor | None = None,
) -> np.ndarray:
    """Pairwise EK-FAC influence ``[n_query, n_train]`` (float64; see the module docstring).

    Args:
        objective: Loss, noise, timestep schedule and draw seed (train and query draws).
        model: The denoiser (not modified: a private copy is prepared).
        train_images: ``[N, C, H, W]`` training images to attribute to (one shard or all).
        train_keys: One stable key per training image (keys the draws).
        query_images: ``[Q, C, H, W]`` images whose diffusion loss is the measurement.
        query_keys: One key per query (a training key gives that sample's draws).
        config: Damping, Fisher mode, batch sizes, int8, dtype/device.
        factors_dir: Where kronfluence keeps factors (cached by fingerprint) and scores; a
            temporary directory (deleted afterwards) if None.
        train_cond: Optional ``encoder_hidden_states`` of the training images.
        query_cond: Optional ``encoder_hidden_states`` of the queries.
        fit_images: The set the curvature ``G`` is fitted on (e.g. the whole training set or a
            fixed sample of it when ``train_images`` is one shard); default ``train_images``.
        fit_keys: Keys of ``fit_images`` (required with them).
        fit_cond: Optional conditioning of ``fit_images``.

    Returns:
        ``scores[q, n] = ∇m(q)ᵀ (G + λI)⁻¹ ∇ℓ(x_n)``; positive = ``x_n`` helps the query.
    """
    config = config or EKFACConfig()
    _check_images(train_images, train_keys, "training")
    _check_images(query_images, query_keys, "query")
    fit = _fit_set(train_images, train_keys, train_cond, fit_images, fit_keys, fit_cond)
    with _factors_root(factors_dir) as root:
        session = _Session(objective, model, *fit[:2], config, root, fit[2])
        train_batch = session.prepare(train_images, train_keys, train_cond)
        query_batch = session.prepare(query_images, query_keys, query_cond)
        session.fit()
        scores_name = "pairwise_" + _fingerprint(
            session.factors_name, train_batch, query_batch, config.model_dump()
        )
        with scoring_mode(session.model), _quiet():
            session.analyzer.compute_pairwise_scores(
                scores_name=scores_name,
                factors_name=session.factors_name,
                query_dataset=_SampleDataset(query_batch),
                train_dataset=_SampleDataset(train_batch),
                per_device_query_batch_size=config.query_batch_size,
                per_device_train_batch_size=config.train_batch_size,
                score_args=session.score_args(per_module=False),
                overwrite_output_dir=True,
            )
            scores = session.analyzer.load_pairwise_scores(scores_name)
    if scores is None:
        raise RuntimeError(f"kronfluence wrote no pairwise scores for {scores_name}")
    out = scores[ALL_MODULE_NAME].to(device="cpu", dtype=torch.float64).numpy()
    if not np.isfinite(out).all():
        raise FloatingPointError("non-finite EK-FAC influence scores")
    return out


def ekfac_self_influence(
    objective: DiffusionObjective,
    model: torch.nn.Module,
    images: torch.Tensor,
    sample_keys: Sequence[SampleKey],
    config: EKFACConfig | None = None,
    factors_dir: str | Path | None = None,
    cond: torch.Tensor | None = None,
    *,
    fit_images: torch.Tensor | None = None,
    fit_keys: Sequence[SampleKey] | None = None,
    fit_cond: torch.Tensor | None = None,
) -> ScoreResult:
    """Risk = EK-FAC self-influence ``∇ℓ(x_n)ᵀ (G + λI)⁻¹ ∇ℓ(x_n)`` (high = risky).

    The curvature ``G`` is fitted on ``fit_images`` (default: ``images`` themselves). To score a
    corpus shard by shard with one curvature, pass the same ``fit_images``/``fit_keys`` and
    ``factors_dir`` for every shard: factors are fitted once, and each sample's score depends
    only on its own draws, so concatenated shard results equal the one-shot result.

    ``per_layer`` holds the per-layer parts (they sum to ``score``: EK-FAC is block diagonal
    over layers). ``stderr`` is NaN: the score is a deterministic function of the keyed draws,
    not a mean of i.i.d. estimates; ``per_timestep`` is None because the self-influence of the
    mean gradient does not split over timesteps.
    """
    config = config or EKFACConfig()
    _check_images(images, sample_keys, "training")
    fit = _fit_set(images, sample_keys, cond, fit_images, fit_keys, fit_cond)
    with _factors_root(factors_dir) as root:
        session = _Session(objective, model, *fit[:2], config, root, fit[2])
        batch = session.prepare(images, sample_keys, cond)
        session.fit()
        scores_name = "self_" + _fingerprint(session.factors_name, batch, config.model_dump())
        with scoring_mode(session.model), _quiet():
            session.analyzer.compute_self_scores(
                scores_name=scores_name,
                factors_name=session.factors_name,
                train_dataset=_SampleDataset(batch),
                per_device_train_batch_size=config.train_batch_size,
                score_args=session.score_args(per_module=True),
                overwrite_output_dir=True,
            )
            scores = session.analyzer.load_self_scores(scores_name)
    if scores is None:
        raise RuntimeError(f"kronfluence wrote no self-influence scores for {scores_name}")
    names = session.layer_names
    per_layer = torch.stack(
        [scores[name].to(device="cpu", dtype=torch.float64) for name in names], dim=1
    ).numpy()
    total = per_layer.sum(axis=1)
    if not np.isfinite(total).all():
        bad = [sample_keys[i] for i in np.flatnonzero(~np.isfinite(total))]
        raise FloatingPointError(f"non-finite EK-FAC self-influence for samples {bad[:10]}")
    return ScoreResult(
        sample_keys=tuple(sample_keys),
        score=total,
        stderr=np.full(total.shape, np.nan),
        per_layer=per_layer,
        layer_names=names,
        per_timestep=None,
        timesteps=objective.schedule.timesteps,
        method=f"ekfac/self-influence/{config.fisher}-ggn",
    )
