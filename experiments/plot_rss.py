"""RSS over time of `mscp patch`, before and after the memory changes (docs/scale.md).

    python experiments/plot_rss.py   # reads docs/figures/memory/*.json, writes rss_over_time.png there
"""
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

folder = Path(__file__).resolve().parents[1] / "figures" / "memory"
fig, axes = plt.subplots(1, 3, figsize=(13, 3.6), sharey=True)
for ax, layers in zip(axes, (4, 8, 16)):
    for name, style in ((f"before_L{layers}_r1", "tab:red"), (f"after_L{layers}_r1", "tab:blue")):
        d = json.loads((folder / f"{name}.json").read_text())
        t, rss = zip(*d["rss_samples"])
        ax.plot(t, [r / 1e9 for r in rss], color=style, lw=1,
                label=f"{name.split('_')[0]}: peak {d['peak_rss_bytes'] / 1e9:.2f} GB")
    ax.set_title(f"{layers} layers")
    ax.set_xlabel("seconds")
    ax.legend(loc="lower center", fontsize=8)
axes[0].set_ylabel("RSS (GB)")
fig.suptitle("mscp patch, 2048-wide fp32 trio: resident memory, sampled every 0.5 s", y=1.03)
fig.savefig(folder / "rss_over_time.png", dpi=110, bbox_inches="tight")
print(folder / "rss_over_time.png")
