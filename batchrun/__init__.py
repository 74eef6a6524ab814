"""batchrun: batch inference over OpenAI-compatible APIs on Ray, under one global rate limit.

Kept import-light on purpose: ``batchrun.commcheck`` runs on GPU machines that
have torch but not the rest of batchrun's dependencies.
"""

__all__ = ["__version__"]
__version__ = "0.1.0"
