"""One adapter per scoring method, each implementing :class:`~.base.Scorer` beside its algorithm.

:data:`BUILTIN` lists them in ``--help`` order; :mod:`diffcurate.influence.registry` registers
them by name. A new method is one more file here and one entry below (or, outside the package,
one :func:`~diffcurate.influence.registry.register_scorer` call).
"""

from diffcurate.influence.scorers.base import Scorer
from diffcurate.influence.scorers.bif import BIFScorer
from diffcurate.influence.scorers.clip_knn import ClipKNNScorer
from diffcurate.influence.scorers.cond_gap import CondGapScorer
from diffcurate.influence.scorers.divergence import DivergenceScorer
from diffcurate.influence.scorers.dmin import DMinScorer
from diffcurate.influence.scorers.ekfac import EKFACScorer
from diffcurate.influence.scorers.global_hessian import GlobalHessianScorer
from diffcurate.influence.scorers.loss import LossScorer
from diffcurate.influence.scorers.random import RandomScorer
from diffcurate.influence.scorers.trace import TraceScorer
from diffcurate.influence.scorers.trak import DTRAKScorer, TRAKScorer

BUILTIN: tuple[Scorer, ...] = (
    TraceScorer(),
    DivergenceScorer(),
    LossScorer(),
    CondGapScorer(),
    EKFACScorer(),
    BIFScorer(),
    TRAKScorer(),
    DTRAKScorer(),
    GlobalHessianScorer(),
    RandomScorer(),
    ClipKNNScorer(),
    DMinScorer(),
)
