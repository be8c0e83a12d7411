"""wgnat: turn a hub-and-spoke WireGuard network into a full mesh."""

# The one version source: pyproject.toml reads it ([tool.setuptools.dynamic]), and
# --version and the wgnat_build_info metric print it.
__version__ = "0.1.0"
