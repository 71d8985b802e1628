"""The reference engine: a tiny hybrid-attention model served through kvalloc, exactly.

It is the template for integrating kvalloc into an engine (see ``engine.py``) and the proof that
kvalloc's block tables are right: for every request the engine's logits equal, bit for bit,
those of the same model recomputing everything without a cache (``serving.mismatches``).

- ``model``: the model (numpy, weights from a seed) and its cache-free forward pass;
- ``kv_buffer``: the device buffer and kvalloc's block layout, the only code touching KV bytes;
- ``engine``: the scheduler loop and the paged forward pass;
- ``serving``: multi-turn conversations and their check.

``python -m kvalloc.reference`` serves a few conversations and checks them.
"""

from kvalloc.reference.engine import Engine, EngineError, Request
from kvalloc.reference.kv_buffer import MissingKVError, PagedKVBuffer
from kvalloc.reference.model import TinyHybridModel, default_config, reference_logits
from kvalloc.reference.serving import Conversation, conversation_mismatches, mismatches, serve

__all__ = [
    "Conversation",
    "conversation_mismatches",
    "Engine",
    "EngineError",
    "MissingKVError",
    "PagedKVBuffer",
    "Request",
    "TinyHybridModel",
    "default_config",
    "mismatches",
    "reference_logits",
    "serve",
]
