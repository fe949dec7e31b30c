"""`slimtune serve`'s HTTP server. It lives in `slimtune.serving.http` (`app`: the FastAPI wiring, `service`: what
the routes do, `schema`: bodies, errors and limits); these names stay importable from here."""

from .serving.http.app import base_name_of, create_app, running, serve
from .serving.http.schema import MAX_BODY, MAX_BYTES_PER_KEY, MAX_REQUESTS_PER_KEY, MAX_TUNINGS_PER_KEY, MAX_UPLOAD, APIError
from .serving.http.service import Service

__all__ = ["MAX_BODY", "MAX_BYTES_PER_KEY", "MAX_REQUESTS_PER_KEY", "MAX_TUNINGS_PER_KEY", "MAX_UPLOAD", "APIError",
           "Service", "base_name_of", "create_app", "running", "serve"]
