"""The colorizer: presets, components, training objective, sampler and the ``Colorizer`` API."""
