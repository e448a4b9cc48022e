"""Ray Serve application (HTTP API and artists' web page) over :class:`model.colorizer.Colorizer`."""
