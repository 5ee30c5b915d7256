"""The offline evaluation report of a training run as one self-contained HTML page. Pure core."""

from __future__ import annotations

import html
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from apps.pipeline.train.trainer import TrainResult

_COLUMNS = (
    "ndcg@{k}",
    "precision@{k}",
    "recall@{k}",
    "map@{k}",
    "hit_rate@{k}",
    "mrr@{k}",
    "coverage@{k}",
    "novelty@{k}",
    "diversity@{k}",
)


def render_html(result: TrainResult, *, title: str, k: int = 10) -> str:
    """A comparison table (popularity, each channel, fused, ranked) and an NDCG bar chart."""
    columns = [c.format(k=k) for c in _COLUMNS]
    systems = sorted(
        result.comparison, key=lambda n: result.comparison[n].get(f"ndcg@{k}", 0.0), reverse=True
    )
    best = max((result.comparison[n].get(f"ndcg@{k}", 0.0) for n in systems), default=1.0) or 1.0
    rows = []
    for name in systems:
        metrics = result.comparison[name]
        cells = "".join(f"<td>{metrics.get(c, float('nan')):.4f}</td>" for c in columns)
        strong = ' class="system"' if name in ("ranked", "fused") else ""
        rows.append(f"<tr{strong}><th>{html.escape(name)}</th>{cells}</tr>")
    bars = []
    for i, name in enumerate(systems):
        value = result.comparison[name].get(f"ndcg@{k}", 0.0)
        width = 420 * value / best
        colour = "#0969da" if name in ("ranked", "fused") else "#8c959f"
        y = 6 + i * 22
        bars.append(
            f'<text x="0" y="{y + 13}" font-size="12">{html.escape(name)}</text>'
            f'<rect x="130" y="{y}" width="{width:.1f}" height="16" fill="{colour}"/>'
            f'<text x="{136 + width:.1f}" y="{y + 13}" font-size="12">{value:.4f}</text>'
        )
    header = "".join(f"<th>{html.escape(c)}</th>" for c in columns)
    ranker = "".join(
        f"<li>{html.escape(n)}: {v:.4f}</li>" for n, v in sorted(result.ranker_metrics.items())
    )
    skipped = "".join(
        f"<li>{html.escape(n)}: {html.escape(r)}</li>" for n, r in result.skipped_channels.items()
    )
    cutoffs = ", ".join(f"{html.escape(n)} = {html.escape(v)}" for n, v in result.cutoffs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 2rem; color: #1f2328; }}
table {{ border-collapse: collapse; margin: 1rem 0; }}
th, td {{ border: 1px solid #d0d7de; padding: 4px 8px; text-align: right; }}
tr th:first-child {{ text-align: left; }}
tr.system {{ background: #ddf4ff; font-weight: 600; }}
</style></head><body>
<h1>{html.escape(title)}</h1>
<p>Validation window after the training cutoff ({cutoffs}); {result.counts.get("valid_users", 0)} users.
Every system is scored on the same users; relevant = any deliberate engagement with an item.</p>
<h2>NDCG@{k}</h2>
<svg width="640" height="{12 + 22 * len(systems)}" role="img">{"".join(bars)}</svg>
<h2>All metrics at {k}</h2>
<table><thead><tr><th>system</th>{header}</tr></thead><tbody>{"".join(rows)}</tbody></table>
<h2>Ranker (validation)</h2><ul>{ranker}</ul>
{f"<h2>Skipped channels</h2><ul>{skipped}</ul>" if skipped else ""}
</body></html>
"""


def write_html(path: Path, result: TrainResult, *, title: str, k: int = 10) -> None:
    """Write ``render_html`` to ``path``."""
    Path(path).write_text(render_html(result, title=title, k=k), encoding="utf-8")
