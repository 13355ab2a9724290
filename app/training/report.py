"""The training report's PNG: loss and per-head accuracy curves."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def write_plot(history: list[dict[str, Any]], path: Path) -> None:
    if not history:
        return
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [h["step"] for h in history]
    k = len(history[0]["val_loss"])
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4))
    for j in range(k):
        ax_loss.plot(steps, [h["val_loss"][j] for h in history], label=f"val head {j + 1}")
        ax_acc.plot(steps, [h["val_top1"][j] for h in history], label=f"head {j + 1}")
    ax_loss.plot(steps, [h["train_loss"][0] for h in history], "k--", label="train head 1")
    ax_loss.set(xlabel="step", ylabel="cross-entropy (nats)", title="MTP loss per head")
    ax_acc.set(xlabel="step", ylabel="top-1 accuracy", title="held-out top-1 accuracy per head")
    ax_loss.legend()
    ax_acc.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    log.info("wrote %s", path)
