"""metatrain: JAX framework for metacognitive pretraining.

Models learn P(text, thinking | context) from documents that interleave text with
LLM-written thinking blocks. See DESIGN.md (shared) for the picture of the system.
"""

__version__ = "0.1.0"
