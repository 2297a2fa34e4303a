"""aligntok: a pretrained vision foundation encoder, aligned into a diffusion tokenizer.

Layers (docs/code.md): foundation modules at the top (`config`, `errors`, `fileio`, `locks`, `runtime`,
`distributed`, `launch`, `telemetry`); the ML packages (`data`, `encoder`, `text`, `tokenizer`, `train`,
`diffusion`, `eval`); operations (`ops`: DVC, MLflow, provenance, promotion, the study); the entry (`cli`).

Importing the package has no side effects; heavy libraries are imported by the
modules that need them.
"""

__version__ = "0.1.0"
