"""Entry points for `ray job submit -- python jobs/<name>.py`; each is a thin shell over plain functions."""
