"""kvalloc: an SWA-aware KV-cache memory manager for hybrid-attention LLMs.

The heavy lifting is in Rust (``kvalloc._core``); this package re-exports it with a small
Python layer (CLI, presentation). Every error kvalloc raises derives from ``KvAllocError``.
"""

from kvalloc._core import (
    MAX_PRIORITY,
    NULL_PAGE,
    BlockHashes,
    ConfigError,
    InvalidArgumentError,
    InvariantError,
    KVCacheManager,
    KVGroup,
    KvAllocError,
    LoadHandle,
    ModelSpec,
    OutOfMemoryError,
    RequestError,
    SlabArena,
    Simulator,
    StaleHandleError,
    StepResult,
    Trace,
    __version__,
    presets,
)

__all__ = [
    "MAX_PRIORITY",
    "NULL_PAGE",
    "BlockHashes",
    "ConfigError",
    "InvalidArgumentError",
    "InvariantError",
    "KVCacheManager",
    "KVGroup",
    "KvAllocError",
    "LoadHandle",
    "ModelSpec",
    "OutOfMemoryError",
    "RequestError",
    "SlabArena",
    "Simulator",
    "StaleHandleError",
    "StepResult",
    "Trace",
    "__version__",
    "presets",
]
