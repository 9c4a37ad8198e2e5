"""jaxseg: glomerulus segmentation of kidney whole-slide images with JAX and Flax.

Nothing is imported here: `python -m jaxseg.X` loads only what its command needs, and
setup.cfg reads `__version__` from this file without importing JAX.
"""
__version__ = "0.1.0"
