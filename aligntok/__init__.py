"""aligntok: a pretrained vision foundation encoder, aligned into a diffusion tokenizer.

Importing the package has no side effects; heavy libraries are imported by the
modules that need them.
"""

__version__ = "0.1.0"
