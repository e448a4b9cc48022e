"""Ray Serve application (HTTP API and artists' web page) over :class:`model.colorizer.Colorizer`.

- ``serve/api.py``: the FastAPI app (no Ray): ``POST /v1/colorize`` (multipart or JSON/base64),
  ``GET /v1/info``, ``GET /healthz``; validation, size limits and optional bearer-token auth.
- ``serve/app.py``: the deployments (``ColorizeIngress`` → ``ColorizerModel`` with ``@serve.batch``) and
  the application builder ``build_app``; ``serve/config.yaml`` deploys it (``serve run serve/config.yaml``).
"""
