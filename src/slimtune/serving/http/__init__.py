"""The HTTP server: `app` (FastAPI wiring), `service` (what the routes do), `schema` (bodies, errors, limits)."""
