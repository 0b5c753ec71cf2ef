"""sdbuild: Core ML Stable Diffusion bundles from declarative YAML recipes."""

__version__ = "0.1.0"
