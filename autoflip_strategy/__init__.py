"""AutoFLIP for Flower: federated hybrid pruning guided by federated loss exploration.

Server side: :class:`AutoFLIP` (a Flower Message-API strategy).
Client side: :class:`AutoFLIPClient` (registers the handlers on a ``ClientApp``); the user's functions are
``train_fn(model, TrainTask) -> TrainOutcome`` and ``evaluate_fn(model, EvalTask) -> EvalOutcome``.
A run with no accepted client reply for ``max-failed-rounds`` rounds in a row raises :class:`RunFailed`.
The math lives in small modules: :mod:`.guidance` (what matters),
:mod:`.masks` (which weights and units to keep), :mod:`.structure`,
:mod:`.intake` (what of the user's model is pruned how, checked numerically) and
:mod:`.compact` (unit couplings and physical surgery), :mod:`.codec` (the
wire format) and :mod:`.costs` (FLOPs).
"""

from .client import AutoFLIPClient, ClientProtocolError, EvalFn, EvalOutcome, EvalTask, TrainFn, TrainOutcome, TrainTask
from .codec import CodecError
from .geometry import Layout
from .config import STRATEGY_OPTIONS, AutoFLIPConfig, ConfigError, Option, parse_options
from .enforce import enforce_mask
from .failures import RunFailed
from .intake import Intake, IntakeReport, intake_model
from .masks import HybridMask, compute_hybrid_mask
from .strategy import AutoFLIP
from .structure import ModelStructure, UnsupportedModelError, discover_structure

__all__ = [
    "AutoFLIP",
    "AutoFLIPClient",
    "AutoFLIPConfig",
    "ClientProtocolError",
    "CodecError",
    "ConfigError",
    "EvalFn",
    "EvalOutcome",
    "EvalTask",
    "HybridMask",
    "Intake",
    "IntakeReport",
    "Layout",
    "ModelStructure",
    "Option",
    "RunFailed",
    "STRATEGY_OPTIONS",
    "TrainFn",
    "TrainOutcome",
    "TrainTask",
    "UnsupportedModelError",
    "compute_hybrid_mask",
    "discover_structure",
    "enforce_mask",
    "intake_model",
    "parse_options",
]
