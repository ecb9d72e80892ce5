"""Speed of probing, kNN graphs, trustworthiness and UMAP against their reference implementations.

Run: ``python benchmarks/probing_embedding.py`` (about 3-5 minutes on two cores; ``--quick`` for a
1,000-sample smoke run). Input: ``n`` x ``d`` float32 features of a 10-class Gaussian mixture
(class centres 3.5 apart along random directions, unit isotropic noise; a linear probe reaches
about 0.91). Both sides of each comparison run in this process, one after the other, and the
ratio ``reference seconds / workbench seconds`` is printed (above 1: the workbench is faster).

Comparisons:
* one layer, 5 folds: scikit-learn ``StandardScaler`` + ``LogisticRegression(max_iter=1000)`` on the
  same folds vs ``probe_layers(control=False)``; also with the control task, and three layers in one call;
* exact kNN graph (k = 15): scikit-learn brute force vs ``knn_graph``; pynndescent (umap-learn's
  approximate search) for reference;
* trustworthiness (k = 10) on a subsample: ``sklearn.manifold.trustworthiness`` vs ours (same value);
* UMAP: umap-learn ``UMAP(n_neighbors=15, random_state=0)`` (first call: numba compilation; second
  call: warm) vs ``embed(method="umap")`` after ``warm_up()``, with trustworthiness of both, and
  the trustworthiness of both over three seeds (``--unseeded``: also umap-learn's default, unseeded run).
"""

from __future__ import annotations

import argparse
import importlib.util
import time
import warnings

import numpy as np
import torch

REPEATS = 3

warnings.filterwarnings("ignore", category=UserWarning)
warnings.filterwarnings("ignore", category=FutureWarning)


def mixture(
    n: int, d: int, n_classes: int = 10, separation: float = 3.5, seed: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.standard_normal((n_classes, d))
    centres *= separation / np.linalg.norm(centres, axis=1, keepdims=True)
    y = np.arange(n) % n_classes
    x = centres[y] + rng.standard_normal((n, d))
    return x.astype(np.float32), y


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - start


def line(name: str, ours: float, reference: float | None, ref_name: str, extra: str = "") -> None:
    if reference is None:
        print(f"{name:<46} workbench {ours:7.2f} s   {ref_name}: not installed{extra}")
    else:
        print(
            f"{name:<46} workbench {ours:7.2f} s   {ref_name} {reference:7.2f} s   ratio {reference / ours:5.2f}x{extra}"
        )


def bench_probing(x: np.ndarray, y: np.ndarray) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from workbench.analyses.probing import probe_layers

    def sklearn_folds(folds: np.ndarray) -> list[float]:
        accuracies = []
        for f in range(int(folds.max()) + 1):
            test = folds == f
            scaler = StandardScaler().fit(x[~test])
            model = LogisticRegression(max_iter=1000).fit(scaler.transform(x[~test]), y[~test])
            accuracies.append(float((model.predict(scaler.transform(x[test])) == y[test]).mean()))
        return accuracies

    # One untimed run of each side first (imports, allocator and thread-pool start-up), then the
    # median of REPEATS timed runs of each side in a block (alternating lets numpy's BLAS threads,
    # still spinning after scikit-learn, compete with torch's).
    result = probe_layers({"x": x}, y, control=False)
    accuracies = sklearn_folds(result.folds)
    reference_times = [timed(sklearn_folds, result.folds)[1] for _ in range(REPEATS)]
    ours_times = [timed(probe_layers, {"x": x}, y, control=False)[1] for _ in range(REPEATS)]
    line(
        f"probe, 1 layer, 5 folds (median of {REPEATS})",
        float(np.median(ours_times)),
        float(np.median(reference_times)),
        "sklearn LogisticRegression",
        f"   accuracy {result.score[0]:.4f} vs {np.mean(accuracies):.4f}",
    )
    with_control, seconds = timed(probe_layers, {"x": x}, y, control=True)
    print(
        f"{'probe, 1 layer, 5 folds + control task':<46} workbench {seconds:7.2f} s   accuracy "
        f"{with_control.score[0]:.4f}, control {with_control.control_score[0]:.4f}"
    )
    rng = np.random.default_rng(1)
    rotation, _ = np.linalg.qr(rng.standard_normal((x.shape[1], x.shape[1])))
    layers = {"x": x, "relu(x)": np.maximum(x, 0), "x @ Q": (x @ rotation).astype(np.float32)}
    several, seconds = timed(probe_layers, layers, y, control=False)
    print(
        f"{'probe, 3 layers in one call, 5 folds':<46} workbench {seconds:7.2f} s   "
        f"({seconds / 3:.2f} s per layer; accuracies {', '.join(f'{s:.4f}' for s in several.score)})"
    )


def bench_knn(x: np.ndarray) -> None:
    from sklearn.neighbors import NearestNeighbors

    from workbench.analyses.knn import clear_knn_cache, knn_graph

    knn_graph(x[:300], 15)
    clear_knn_cache()
    graph, ours = timed(knn_graph, x, 15)
    start = time.perf_counter()
    _, indices = NearestNeighbors(n_neighbors=15, algorithm="brute").fit(x).kneighbors()
    reference = time.perf_counter() - start
    agree = float((np.sort(indices, 1) == np.sort(graph.indices, 1)).mean())
    line("exact kNN graph, k = 15", ours, reference, "sklearn brute", f"   same neighbours {agree:.4%}")
    _, cached = timed(knn_graph, x, 10)
    print(f"{'kNN graph again (k = 10, from the cache)':<46} workbench {cached:7.3f} s")
    if importlib.util.find_spec("pynndescent") is not None:
        from pynndescent import NNDescent

        start = time.perf_counter()
        index = NNDescent(x, n_neighbors=16, random_state=0)
        approx, _ = index.neighbor_graph
        seconds = time.perf_counter() - start
        recall = float(np.mean([len(set(a[1:]) & set(b)) / 15 for a, b in zip(approx, graph.indices)]))
        print(
            f"{'pynndescent (approximate, umap-learn default)':<46} {seconds:7.2f} s (includes numba compilation "
            f"on first use)   recall {recall:.4f}"
        )


def bench_trustworthiness(x: np.ndarray, coords: np.ndarray, n_sub: int) -> None:
    from sklearn.manifold import trustworthiness as sk_trustworthiness

    from workbench.analyses.embedding import trustworthiness

    rows = np.random.default_rng(0).choice(len(x), size=min(n_sub, len(x)), replace=False)
    ours_value, ours = timed(trustworthiness, x[rows], coords[rows], k=10)
    ref_value, reference = timed(sk_trustworthiness, x[rows], coords[rows], n_neighbors=10)
    line(
        f"trustworthiness, n = {len(rows)}",
        ours,
        reference,
        "sklearn",
        f"   values {ours_value:.6f} vs {ref_value:.6f}",
    )
    if len(rows) == len(x):  # the comparison above already ran on every sample
        return
    full, seconds = timed(trustworthiness, x, coords, k=10)
    print(
        f"{f'trustworthiness, n = {len(x)}':<46} workbench {seconds:7.2f} s   value {full:.4f} "
        f"(sklearn's version holds two {len(x)}x{len(x)} distance matrices: "
        f"{2 * len(x) ** 2 * 8 / 2**30:.1f} GiB at this n, not run)"
    )


def bench_umap(x: np.ndarray, full: bool, unseeded: bool) -> np.ndarray:
    from workbench.analyses.embedding import embed, trustworthiness, warm_up

    if importlib.util.find_spec("umap") is None:
        print("umap-learn: not installed")
        return np.zeros((len(x), 2))
    import umap

    _, cold = timed(umap.UMAP(n_neighbors=15, random_state=0).fit_transform, x)
    reference_coords, reference = timed(umap.UMAP(n_neighbors=15, random_state=0).fit_transform, x)
    reference_trust = trustworthiness(x, reference_coords, k=10)
    print(f"{'umap-learn UMAP(random_state=0), first call':<46} {cold:7.2f} s (numba compilation included)")
    warm_seconds = warm_up()
    print(f"{'workbench warm_up()':<46} {warm_seconds:7.2f} s")
    result, ours = timed(embed, x, method="umap", seed=0)
    line(
        "UMAP, warm, seed 0",
        ours,
        reference,
        "umap-learn",
        f"   trustworthiness {result.trustworthiness:.4f} vs {reference_trust:.4f}",
    )
    again, seconds = timed(embed, x, method="umap", seed=0)
    print(
        f"{'UMAP again (kNN graph cached)':<46} workbench {seconds:7.2f} s   same coordinates: "
        f"{bool(np.array_equal(again.coordinates, result.coordinates))}"
    )
    if unseeded:
        default_coords, seconds = timed(umap.UMAP(n_neighbors=15).fit_transform, x)
        print(
            f"{'umap-learn UMAP() without a seed (parallel)':<46} {seconds:7.2f} s (first unseeded call compiles)   "
            f"trustworthiness {trustworthiness(x, default_coords, k=10):.4f}"
        )
    seeds = (1, 2)
    ours_more = [embed(x, method="umap", seed=s).trustworthiness for s in seeds]
    reference_more = [
        trustworthiness(x, umap.UMAP(n_neighbors=15, random_state=s).fit_transform(x), k=10) for s in seeds
    ]
    print(
        f"{'trustworthiness over seeds 0, 1, 2':<46} workbench "
        f"{', '.join(f'{v:.4f}' for v in [result.trustworthiness, *ours_more])}   umap-learn "
        f"{', '.join(f'{v:.4f}' for v in [reference_trust, *reference_more])}"
    )
    if full:
        short_run, seconds = timed(embed, x, method="umap", seed=0, n_epochs=200)
        print(
            f"{'UMAP, 200 epochs (default: 500 up to 10k)':<46} workbench {seconds:7.2f} s   trustworthiness "
            f"{short_run.trustworthiness:.4f}"
        )
    return reference_coords


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000)
    parser.add_argument("--d", type=int, default=512)
    parser.add_argument("--quick", action="store_true", help="1,000 samples, for a smoke run")
    parser.add_argument("--full", action="store_true", help="also a 200-epoch UMAP (faster, less faithful)")
    parser.add_argument("--unseeded", action="store_true", help="also umap-learn without a seed (compiles again)")
    parser.add_argument("--skip-umap", action="store_true")
    args = parser.parse_args()
    n = 1000 if args.quick else args.n
    x, y = mixture(n, args.d)
    print(f"{n} x {args.d} float32, 10 classes; torch {torch.__version__}, {torch.get_num_threads()} threads")
    bench_probing(x, y)
    bench_knn(x)
    if args.skip_umap:
        from workbench.analyses.embedding import embed

        coords = embed(x, method="pca").coordinates
    else:
        coords = bench_umap(x, args.full, args.unseeded)
    bench_trustworthiness(x, coords, n_sub=min(n, 3000))


if __name__ == "__main__":
    main()
