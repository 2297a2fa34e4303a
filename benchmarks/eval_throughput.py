"""Evaluation throughput: the FID feature extractor and the linear probe, each beside a peer, in one run.

- Inception: `aligntok.eval.inception.InceptionFeatures` (the TorchScript TF-FID network, with its 8-bit
  quantisation and mapping; inputs already 299 px, so no resize) against torchvision's `inception_v3`
  (random initialisation, no aux head, eval mode) on the same 299 px batches. Images/s.
- Linear probe: `aligntok.eval.probe.linear_probe` (sklearn `LogisticRegression`, L-BFGS, standardised)
  against the same objective written in torch (`torch.optim.LBFGS`, float64, strong-Wolfe line search)
  and against sklearn's `SGDClassifier(loss="log_loss")`, on synthetic 10-class features (5,000 x 32
  training, 1,000 validation). Training samples/s of the fit (standardisation included); top-1 printed to
  show that the peers solve the same problem.

    python benchmarks/eval_throughput.py                       # ~1-2 minutes on 2 cores
    python benchmarks/eval_throughput.py --threads 1 --batches 3 --json benchmarks/out/eval.json
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout

from common import cpu_model  # noqa: E402  (benchmarks/, the script's own folder)

from aligntok.eval.inception import SIZE, InceptionFeatures  # noqa: E402
from aligntok.eval.probe import linear_probe  # noqa: E402


@dataclass
class Row:
    workload: str
    method: str
    items: int
    seconds: float
    top1: float | None = None

    @property
    def rate(self) -> float:
        return self.items / self.seconds


def time_forward(fn, batches: list[torch.Tensor]) -> float:
    """Wall seconds for fn over all batches, after one warm-up call on a 2-image batch."""
    with torch.inference_mode():
        fn(batches[0][:2])
        start = time.perf_counter()
        for x in batches:
            fn(x)
    return time.perf_counter() - start


def bench_inception(batch: int, count: int) -> list[Row]:
    torch.manual_seed(0)
    batches = [torch.rand(batch, 3, SIZE, SIZE) for _ in range(count)]  # (B, 3, 299, 299) in [0, 1]
    ours = InceptionFeatures()
    from torchvision.models import inception_v3

    peer = inception_v3(weights=None, aux_logits=False, init_weights=False).eval()
    n = batch * count
    return [Row("inception 299px", "aligntok InceptionFeatures (TorchScript)", n, time_forward(ours, batches)),
            Row("inception 299px", "torchvision inception_v3 (random init)", n,
                time_forward(lambda x: peer(x * 2 - 1), batches))]


def probe_data(n_train: int, n_val: int, dim: int, classes: int) -> tuple[np.ndarray, ...]:
    """Gaussian classes with overlapping means (top-1 well below 1): train/val features and labels."""
    rng = np.random.default_rng(0)
    means = 0.6 * rng.standard_normal((classes, dim))
    y_train, y_val = rng.integers(0, classes, n_train), rng.integers(0, classes, n_val)
    scale = rng.uniform(0.1, 10.0, dim)  # unequal feature scales: standardisation matters
    x_train = (means[y_train] + rng.standard_normal((n_train, dim))) * scale
    x_val = (means[y_val] + rng.standard_normal((n_val, dim))) * scale
    return x_train, y_train, x_val, y_val


def torch_lbfgs_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray,
                      C: float = 1.0, max_iter: int = 1000) -> float:
    """sklearn's objective, C * sum CE + |W|^2 / 2 (divided by C * n), with torch's L-BFGS: top-1."""
    mean, std = x_train.mean(0), x_train.std(0)
    xt = torch.from_numpy((x_train - mean) / std)  # (N, D) float64
    xv = torch.from_numpy((x_val - mean) / std)
    yt = torch.from_numpy(y_train)
    classes = int(y_train.max()) + 1
    w = torch.zeros(xt.shape[1], classes, dtype=torch.float64, requires_grad=True)
    b = torch.zeros(classes, dtype=torch.float64, requires_grad=True)
    opt = torch.optim.LBFGS([w, b], max_iter=max_iter, tolerance_grad=1e-4 / len(xt), line_search_fn="strong_wolfe")

    def closure() -> torch.Tensor:
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(xt @ w + b, yt) + (w * w).sum() / (2 * C * len(xt))
        loss.backward()
        return loss

    opt.step(closure)
    with torch.no_grad():
        return float(((xv @ w + b).argmax(1).numpy() == y_val).mean())


def sgd_probe(x_train: np.ndarray, y_train: np.ndarray, x_val: np.ndarray, y_val: np.ndarray) -> float:
    from sklearn.linear_model import SGDClassifier
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x_train)
    clf = SGDClassifier(loss="log_loss", alpha=1e-4, max_iter=1000, tol=1e-4, random_state=0)
    clf.fit(scaler.transform(x_train), y_train)
    return float((clf.predict(scaler.transform(x_val)) == y_val).mean())


def bench_probe(n_train: int, dim: int, classes: int = 10) -> list[Row]:
    data = probe_data(n_train, 1000, dim, classes)
    rows = []
    for method, fit in (("aligntok linear_probe (sklearn LogisticRegression lbfgs)", lambda: linear_probe(*data).top1),
                        ("torch LBFGS logistic regression", lambda: torch_lbfgs_probe(*data)),
                        ("sklearn SGDClassifier log_loss", lambda: sgd_probe(*data))):
        start = time.perf_counter()
        top1 = fit()
        rows.append(Row(f"probe {n_train}x{dim}", method, n_train, time.perf_counter() - start, top1))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=16, help="Inception batch size")
    parser.add_argument("--batches", type=int, default=2, help="timed Inception batches per method")
    parser.add_argument("--probe-samples", type=int, default=5000)
    parser.add_argument("--probe-dim", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    import sklearn

    print(f"torch {torch.__version__}, sklearn {sklearn.__version__}, {torch.get_num_threads()} threads, "
          f"CPU: {cpu_model()}")
    rows = bench_inception(args.batch, args.batches) + bench_probe(args.probe_samples, args.probe_dim)
    for workload in dict.fromkeys(r.workload for r in rows):
        group = [r for r in rows if r.workload == workload]
        unit = "images/s" if workload.startswith("inception") else "samples/s"
        print(f"\n{workload}")
        for r in group:
            top1 = f"  top-1 {r.top1:.3f}" if r.top1 is not None else ""
            print(f"  {r.method:<58} {r.rate:9.1f} {unit}  ({r.items} in {r.seconds:.2f} s)"
                  f"  x{r.rate / group[0].rate:.2f} of aligntok{top1}")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"torch": torch.__version__, "threads": torch.get_num_threads(),
                                         "cpu": cpu_model(), "rows": [asdict(r) | {"rate": r.rate} for r in rows]},
                                        indent=2) + "\n")


if __name__ == "__main__":
    main()
