"""One PNG of the benchmark results in a folder of JSON files written by `mtp bench ... --out`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def plot_benchmarks(results_dir: str, png: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    res: dict[str, Any] = {}
    for f in sorted(Path(results_dir).glob("*.json")):
        data = json.loads(f.read_text())
        res.setdefault(data.get("benchmark", f.stem), data)
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    spec = res.get("speculative_vs_plain_greedy")
    if spec:
        ax = axes[0]
        names, vals = ["plain", "speculative"], [spec["plain_tokens_per_s"], spec["speculative_tokens_per_s"]]
        comp = spec.get("compiled")
        if comp:
            names += ["plain\ncompiled", "speculative\ncompiled"]
            vals += [comp["plain_tokens_per_s"], comp["speculative_tokens_per_s"]]
        ax.bar(names, vals, color=["C0", "C1", "C0", "C1"][: len(vals)])
        ax.set(
            title=f"greedy, batch 1: {spec['speedup']}x, {spec['tokens_per_forward']} tok/forward", ylabel="tokens/s"
        )
    hf = res.get("ours_vs_transformers_generate")
    if hf:
        ax = axes[1]
        labels = [f"b={r['batch_size']}" for r in hf["results"]]
        x = range(len(labels))
        series = [
            ("transformers_tokens_per_s", "transformers"),
            ("plain_tokens_per_s", "ours plain"),
            ("compiled_plain_tokens_per_s", "ours plain, compiled"),
            ("speculative_tokens_per_s", "ours speculative"),
        ]
        series = [(key, name) for key, name in series if all(key in r for r in hf["results"])]
        w = 0.8 / len(series)
        for i, (key, name) in enumerate(series):
            ax.bar([j + i * w for j in x], [r[key] for r in hf["results"]], width=w, label=name)
        ax.set_xticks([j + 0.4 - w / 2 for j in x], labels)
        ax.set(title="GPT-2 shape vs transformers generate()", ylabel="tokens/s")
        ax.legend()
    svc = res.get("service_under_load")
    if svc:
        ax = axes[2]
        names = ["predict b=1", "predict batched", "generate 1", "generate N"]
        vals = [
            svc["predict_unbatched"]["requests_per_s"],
            svc["predict_batched"]["requests_per_s"],
            svc["generate_1_stream"]["tokens_per_s"],
            svc["generate_n_streams"]["tokens_per_s"],
        ]
        ax.bar(names, vals, color=["C0", "C0", "C1", "C1"])
        ax.set(title="service: req/s (predict), tokens/s (generate)")
    fig.tight_layout()
    Path(png).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(png, dpi=90)
    plt.close(fig)
