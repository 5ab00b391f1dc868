"""Serving many adapter sets on one backbone over HTTP (``peft-mtl serve``; extra ``peft_mtl[serve]``).

``worker`` owns the model and batches requests across sets and tasks; ``app`` is the FastAPI
application (endpoints, limits, auth, metrics); ``server`` runs it with uvicorn.
"""

from .app import ServeConfig, create_app

__all__ = ["ServeConfig", "create_app"]
