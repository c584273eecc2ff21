"""The engine room: everything between a queued request and the sampled tokens.

Torch-free at this level (the HTTP process imports only these): the configuration, the request
and output types, the typed core messages, the errors, and the clients. The compute side
(`llm_engine`, `scheduler`, `model_runner`, `sampler`, ...) is imported by the engine core only.
"""

from fusionserve.server.engine.client import EngineClient
from fusionserve.server.engine.config import EngineConfig
from fusionserve.server.engine.errors import (
    EngineDeadError,
    EngineError,
    EngineShuttingDownError,
    EngineStartError,
    QueueFullError,
    RequestTooLongError,
)
from fusionserve.server.engine.messages import (
    EngineCoreOutputs,
    EngineLimits,
    EngineStats,
    RequestOutput,
    StepStats,
)
from fusionserve.server.engine.params import SamplingParams, TokenLogprob

__all__ = [
    "EngineClient",
    "EngineConfig",
    "EngineCoreOutputs",
    "EngineDeadError",
    "EngineError",
    "EngineLimits",
    "EngineShuttingDownError",
    "EngineStartError",
    "EngineStats",
    "QueueFullError",
    "RequestOutput",
    "RequestTooLongError",
    "SamplingParams",
    "StepStats",
    "TokenLogprob",
]
