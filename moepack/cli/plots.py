"""Pictures for `inspect --plot`: bits per weight per expert beside routing frequency."""

from __future__ import annotations

from pathlib import Path

from moepack.errors import MoepackError


def plot_bits_heatmap(pack: Path, out: Path) -> Path:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import numpy as np
    except ImportError:
        raise MoepackError("--plot needs matplotlib: pip install matplotlib") from None
    from moepack.format.validate import read_manifest

    m = read_manifest(pack)
    layers = sorted({e.layer for e in m.experts})
    n_exp = max(e.expert for e in m.experts) + 1
    bits = np.full((len(layers), n_exp), np.nan)
    freq = np.full((len(layers), n_exp), np.nan)
    row = {layer: i for i, layer in enumerate(layers)}
    for e in m.experts:
        weights = sum(p.shape[0] * p.shape[1] for p in e.projections.values())
        bits[row[e.layer], e.expert] = e.nbytes * 8 / weights
        if e.frequency is not None:
            freq[row[e.layer], e.expert] = e.frequency
    fig, axes = plt.subplots(1, 2, figsize=(max(8, n_exp * 0.5 + 4), max(3, len(layers) * 0.35 + 1.5)))
    for ax, data, title, cmap in ((axes[0], bits, "bits per weight", "viridis"),
                                  (axes[1], freq, "routing frequency", "magma")):
        im = ax.imshow(data, aspect="auto", cmap=cmap, interpolation="nearest")
        ax.set_title(title)
        ax.set_xlabel("expert")
        ax.set_ylabel("layer")
        ax.set_yticks(range(len(layers)), [str(v) for v in layers])
        fig.colorbar(im, ax=ax)
    if np.isnan(freq).all():
        axes[1].text(0.5, 0.5, "not profiled", ha="center", va="center", transform=axes[1].transAxes)
    fig.suptitle(f"{pack.name}: {m.meta.get('ratio', '?')}x")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
