"""AutoFLIP for Flower: federated hybrid pruning guided by federated loss exploration.

Server side: :class:`AutoFLIP` (a Flower Message-API strategy, used like ``FedAvg``).
Client side: :class:`AutoFLIPClient` (registers the handlers on a ``ClientApp``); the user's functions are
``train_fn(model, TrainTask) -> TrainOutcome`` and ``evaluate_fn(model, EvalTask) -> EvalOutcome``.
A run with no accepted client reply for ``max-failed-rounds`` rounds in a row raises :class:`RunFailed`.

Module map (one concept per module)
-----------------------------------
One round reads through six files, server -> client -> server:

=================  ==========================================================================================
``strategy``       the orchestration in Flower's hooks (configure/aggregate train and evaluate, start, resume)
``scoring``        the method: which weights matter (one object per method; new methods plug in here)
``geometry``       mask geometry: kept entries, compact shapes, :class:`Layout` (global <-> compact)
``codec``          the wire format: encode/decode model, mask and guidance payloads, strictly
``client``         the client handlers: decode, compact model, the user's training, encode the reply
``aggregation``    reply validation (train, explore, evaluate) and the one streaming weighted average
=================  ==========================================================================================

Called from those, each with one job:

=================  ==========================================================================================
``masks``          the hybrid mask from scores (units per group, then one global ranking of weights)
``guidance``       AutoFLIP's scores: exploration's matrices, their normalisation and per-round refresh
``structure``      which tensors are prunable and which slices form one unit (traced with Torch-Pruning)
``intake``         what of the user's model is pruned how, checked numerically
``compact``        physical surgery: a narrower copy of the model
``enforce``        pruned weights stay zero while a client trains
``quantise``       value precision on the wire (float16 / int8 blocks, error feedback)
``costs``          FLOPs per example of the compact model
``rounds``         the typed per-round record and the failed-round streak
``nodes``          partition handshake, absent nodes, seeded sampling, one reply per node
``failures``       run failure and condensed client error reasons
``checkpoint``     the strategy's state on disk, atomically, without pickled code
``config``         every option once: type, default, range, help
``protocol``       the message keys both sides share
``saliency``       SynFlow (server, data-free) and SNIP (client) scores at initialisation
``signs``          HideNseek's sign-bit transport and weighted sign vote
``supermask``      HideNseek's client side: training sign scores, never magnitudes
=================  ==========================================================================================

See ``docs/architecture.md`` for one round step by step.
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
