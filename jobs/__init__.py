"""Entry points for ``ray job submit -- python jobs/<name>.py``: each parses its flags (the shared ones from
``jobs/flags.py``) and calls one typed function of :mod:`model` or :mod:`pipelines`; no job imports another."""
