"""results.md tables shaped like the paper's (Tables 1, 6, 7), and the plots: accuracy per setting with error bars,
similarity heatmaps. Inputs are the dictionaries `experiments.align` and `experiments.similarity` write as JSON."""
from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from linalign_jax.io_utils import atomic_path


def pm(mean: float | None, std: float | None, scale: float = 100.0, digits: int = 1) -> str:
    """"93.1 ± 0.4" (accuracy in %) or "0.801 ± 0.012" (scale=1, digits=3); "–" when absent."""
    if mean is None:
        return "–"
    return f"{mean * scale:.{digits}f} ± {(std or 0.0) * scale:.{digits}f}"


def _stat(settings: Mapping, sid: str, key: str, scale: float = 100.0, digits: int = 1) -> str:
    entry = settings.get(sid)
    if entry is None or key not in entry["mean"]:
        return "–"
    return pm(entry["mean"][key], entry["std"][key], scale, digits)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines)


def results_markdown(results: Mapping) -> str:
    """The whole results.md for one (source, target, task) run."""
    cfg, settings = results["config"], results["settings"]
    src, tgt = results["models"]["source"]["spec"], results["models"]["target"]["spec"]
    task, ood = cfg["task_data"], cfg.get("ood_data") or "–"
    shots = sorted({e["shots"] for e in settings.values() if e["shots"] is not None})
    seeds = cfg["seeds"]
    out = [f"# Linear alignment: {src} → {tgt} on {task}", "",
           f"Target (Party A, owns the head) = **{tgt}**; source (Party B, maps its embeddings) = **{src}**. "
           f"Map: `{cfg['map']}`, pooling `{cfg['pooling']}`. Every cell is mean ± std over seeds {seeds}. "
           f"Command: `{results['command']}`", ""]

    out += ["## Task-supervised map (paper Table 1)", "",
            _table(["ID data", "Target (A)", "Source (B)", "Acc. native", "Acc. LinMap", "OOD set", "AUROC native",
                    "AUROC LinMap"],
                   [[task, tgt, src, _stat(settings, "native", "accuracy"), _stat(settings, "task_map", "accuracy"),
                     ood, _stat(settings, "native", "energy_auroc", 1, 3),
                     _stat(settings, "task_map", "energy_auroc", 1, 3)]]), ""]

    header = ["Data", "Target (A)", "Source (B)", "Full"] + [f"Base {k}" for k in shots] + ["Public only"] + \
        [f"Public + ID {k}" for k in shots]
    row = [task, tgt, src, _stat(settings, "native", "accuracy")] + \
        [_stat(settings, f"few_shot@{k}", "accuracy") for k in shots] + [_stat(settings, "public", "accuracy")] + \
        [_stat(settings, f"public+id@{k}", "accuracy") for k in shots]
    unit = "per class" if cfg.get("per_class_shots") else "in total, stratified"
    out += ["## Public-data map and few-shot baselines, accuracy % (paper Tables 2 and 6)", "",
            f"Base k = the source's own head trained on k labelled task rows ({unit}); Public + ID k = map fitted "
            "on the public corpus plus those k rows.", "", _table(header, [row]), ""]

    if cfg.get("ood_data"):
        metrics = [("energy_auroc", "Energy AUROC"), ("msp_auroc", "MSP AUROC"), ("energy_fpr95", "Energy FPR@95TPR"),
                   ("msp_fpr95", "MSP FPR@95TPR")]
        first = settings[_order(results)[0]]["mean"]
        metrics += [(m, label) for m, label in (("knn_auroc", "kNN AUROC"), ("mahalanobis_auroc", "Mahalanobis AUROC"),
                                                ("knn_fpr95", "kNN FPR@95TPR"),
                                                ("mahalanobis_fpr95", "Mahalanobis FPR@95TPR")) if m in first]
        out += [f"## OOD detection: ID {task} vs OOD {ood} (paper Table 7 reports Energy AUROC)", "",
                _table(["Setting"] + [m[1] for m in metrics],
                       [[sid] + [_stat(settings, sid, m, 1, 3) for m, _ in metrics] for sid in _order(results)]),
                ""]

    mapped = [sid for sid in _order(results) if "map" in settings[sid]["mean"]]
    if mapped:
        rows = []
        for sid in mapped:
            m, s = settings[sid]["mean"]["map"], settings[sid]["std"]["map"]
            rows.append([sid, pm(m["r2"], s["r2"], 1, 3), pm(m["cosine"], s["cosine"], 1, 3),
                         pm(m["top1"], s["top1"]), pm(m["top5"], s["top5"]),
                         f"{m['lambda']:.3g}" if "lambda" in m else "–", f"{m.get('map_rows', 0):.0f}",
                         f"{m['effective_rank']:.1f}" if "effective_rank" in m else "–"])
        out += ["## Map quality on the task's test pairs", "",
                _table(["Setting", "R²", "mean cosine", "top-1 %", "top-5 %", "λ", "fit rows", "eff. rank of W"], rows),
                ""]
    out += ["## Accuracy of every setting, %", "", _table(["Setting", "accuracy"], [
        [sid, _stat(settings, sid, "accuracy")] for sid in _order(results)]), ""]
    return "\n".join(out)


def _order(results: Mapping) -> list[str]:
    return list(results.get("setting_ids") or results["settings"])


def accuracy_title(results: Mapping) -> str:
    """accuracy.png's title: what was mapped to what, on which task, with which map method."""
    src, tgt = results["models"]["source"]["spec"], results["models"]["target"]["spec"]
    return f"{src} → {tgt} on {results['config']['task_data']}, {results['config']['map']} map"


def plot_accuracy(results: Mapping, path: str | Path) -> Path:
    """Bar chart of accuracy per setting with ±std error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = results["settings"]
    names = _order(results)
    means = [100 * settings[n]["mean"]["accuracy"] for n in names]
    stds = [100 * settings[n]["std"]["accuracy"] for n in names]
    fig, ax = plt.subplots(figsize=(max(5.0, 0.8 * len(names)), 3.6))
    ax.bar(range(len(names)), means, yerr=stds, capsize=3, color="#4c72b0")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_ylabel("accuracy (%)")
    ax.set_title(accuracy_title(results), fontsize=9)
    ax.set_ylim(0, 100)
    fig.tight_layout()
    return _save(fig, path)


def plot_similarity(matrix: np.ndarray, names: Sequence[str], title: str, path: str | Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(1.2 * len(names) + 2, 1.0 * len(names) + 1.5))
    im = ax.imshow(matrix, vmin=0, vmax=1, cmap="viridis")
    ax.set_xticks(range(len(names)), names, rotation=35, ha="right")
    ax.set_yticks(range(len(names)), names)
    for i in range(len(names)):
        for j in range(len(names)):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center",
                    color="white" if matrix[i, j] < 0.6 else "black", fontsize=8)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def similarity_markdown(matrices: Mapping[str, np.ndarray], names: Sequence[str], command: str) -> str:
    out = ["# Representational similarity", "", f"Command: `{command}`", ""]
    for measure, mat in matrices.items():
        out += [f"## {measure}", "", _table([""] + list(names),
                                            [[n] + ["–" if np.isnan(v) else f"{v:.3f}" for v in mat[i]]
                                             for i, n in enumerate(names)]), ""]
    return "\n".join(out)


def _save(fig, path: str | Path) -> Path:
    import matplotlib.pyplot as plt

    path = Path(path)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=120, format=path.suffix.lstrip(".") or "png")
    plt.close(fig)
    return path


def plot_layer_matrix(matrix: np.ndarray, row_model: str, col_model: str, title: str, path: str | Path) -> Path:
    """Heatmap of a [source layers, target layers] matrix (layer 0 = embeddings), colour-scaled to its own range."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = matrix.shape
    fig, ax = plt.subplots(figsize=(0.45 * cols + 3, 0.4 * rows + 2))
    im = ax.imshow(matrix, cmap="viridis", aspect="auto")
    ax.set_xlabel(f"{col_model} layer")
    ax.set_ylabel(f"{row_model} layer")
    ax.set_xticks(range(cols))
    ax.set_yticks(range(rows))
    for i in range(rows):
        for j in range(cols):
            ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", color="white", fontsize=6)
    ax.set_title(title, fontsize=9)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return _save(fig, path)


def layer_sweep_markdown(result: Mapping) -> str:
    """The matched-depth table (paper App. E's shape) and every layer × layer matrix."""
    diag = result["matched_depth"]
    cols = [k for k in diag[0] if k not in ("source_layer", "target_layer")]
    out = ["# Layer sweep", "", f"Command: `{result['command']}`", "",
           f"Source {result['models']['source']['spec']} ({result['models']['source']['hidden_states']} hidden "
           f"states) → target {result['models']['target']['spec']} ({result['models']['target']['hidden_states']}); "
           "layer 0 = embeddings.", "", "## Matched depth", "",
           _table(["source layer", "target layer"] + cols,
                  [[str(d["source_layer"]), str(d["target_layer"])] + [f"{d[c]:.3f}" for c in cols] for d in diag]),
           "",
           "Native accuracy of a head on each target layer: "
           + ", ".join(f"{j}: {a:.3f}" for j, a in enumerate(result["alignment"]["native_accuracy"])), ""]
    for group in ("similarity", "alignment"):
        for name, mat in result[group].items():
            mat = np.asarray(mat)
            if mat.ndim != 2:
                continue
            out += [f"## {group}: {name}", "", _table(["src \\ tgt"] + [str(j) for j in range(mat.shape[1])],
                                                      [[str(i)] + [f"{v:.3f}" for v in row] for i, row in enumerate(mat)]),
                    ""]
    return "\n".join(out)
