"""growlm: grow Transformers layer by layer over a frozen token substrate, and compose specialists."""

__version__ = "0.1.0"
