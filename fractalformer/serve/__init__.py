"""``fractalformer serve``: an HTTP API and a page for every sub-model of a run, batched.

Needs the ``serve`` extra (FastAPI, uvicorn, sse-starlette): ``pip install 'fractalformer[serve]'``.
"""

from .app import Limits, create_app, model_cards, serve
from .batcher import Batcher, Job, QueueFull

__all__ = ["Batcher", "Job", "Limits", "QueueFull", "create_app", "model_cards", "serve"]
