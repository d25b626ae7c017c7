"""Draw softmax vs α-entmax vs PLADIS weights on one attention row → docs/images/weights.png.

Usage: ``.venv/bin/python tools/plot_weights.py [output.png]``. matplotlib is a tool dependency
only (``pip install matplotlib``), never needed by the extension at runtime.
"""

from __future__ import annotations

import os
import sys

import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
sys.path.insert(0, ROOT)

from pladis.attention import pladis_weights  # noqa: E402 - after the path set-up
from pladis.entmax import entmax  # noqa: E402

TOKENS = [
    "<bos>",
    "a",
    "photo",
    "of",
    "a",
    "red",
    "fox",
    "in",
    "the",
    "snow",
    "<eos>",
    "<pad>",
    "<pad>",
    "<pad>",
]


def row_scores() -> torch.Tensor:
    """One query row of scaled scores (hand-picked): a BOS sink, two salient words, a flat tail."""
    return torch.tensor([2.2, 0.1, 0.6, -0.2, 0.0, 1.7, 2.0, -0.1, 0.2, 0.9, 0.3, -0.4, -0.5, -0.5])


def main(path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scores = row_scores()[None]
    series = [
        ("softmax (stock)", torch.softmax(scores, -1), "#8c8c8c"),
        ("1.5-entmax", entmax(scores, 1.5), "#4c72b0"),
        ("sparsemax (α=2)", entmax(scores, 2.0), "#55a868"),
        ("PLADIS α=1.5, λ=2", pladis_weights(scores, 1.5, 2.0), "#c44e52"),
    ]
    fig, ax = plt.subplots(figsize=(9, 3.6), dpi=120)
    width = 0.2
    positions = torch.arange(len(TOKENS), dtype=torch.float32)
    for i, (label, weights, colour) in enumerate(series):
        ax.bar(positions + (i - 1.5) * width, weights[0].tolist(), width, label=label, color=colour)
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xticks(positions.tolist(), TOKENS, rotation=30, ha="right")
    ax.set_ylabel("attention weight")
    ax.set_title("One cross-attention row: PLADIS = (1-λ)·softmax + λ·entmax (weights may go negative)")
    ax.legend(ncols=2, fontsize=8, frameon=False)
    fig.tight_layout()
    os.makedirs(os.path.dirname(path), exist_ok=True)
    fig.savefig(path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else os.path.join(ROOT, "docs", "images", "weights.png"))
