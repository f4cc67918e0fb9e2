"""metatrain: JAX framework for metacognitive pretraining.

Models learn P(text, thinking | context) from documents that interleave text with
LLM-written thinking blocks. See docs/design.md for the picture of the system.
"""

__version__ = "0.1.0"

from metatrain.io.storage import configure_storage as _configure_storage

_configure_storage()  # before gcsfs is imported: STORAGE_EMULATOR_HOST reaches every library
