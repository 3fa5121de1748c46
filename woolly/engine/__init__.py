"""The stateful facade: Engine, Session, samplers, and the continuous-batching scheduler."""
from woolly.engine.config import CacheConfig, EngineConfig, EngineConfigBuilder, MmapConfig
from woolly.engine.engine import Engine, EngineStats
from woolly.engine.samplers import DefaultSampler, GenerationParams, MirostatSampler, Sampler
from woolly.engine.scheduler import GenerationResult, TokenEvent
from woolly.engine.session import Session, SessionStats

__all__ = ["CacheConfig", "DefaultSampler", "Engine", "EngineConfig", "EngineConfigBuilder", "EngineStats",
           "GenerationParams", "GenerationResult", "MirostatSampler", "MmapConfig", "Sampler", "Session",
           "SessionStats", "TokenEvent"]
