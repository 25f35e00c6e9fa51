"""Self-contained HTML pages: tables and matplotlib figures inlined as PNG data, no external files.

Every page counts its images once loaded and writes the counts on ``<body data-images data-decoded>``,
so a headless browser can confirm that each plot decoded."""

from __future__ import annotations

import base64
import html
import io
from typing import Iterable

_CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:2rem auto;max-width:1200px;color:#1b1b1b;padding:0 1rem}
h1{font-size:1.6rem}h2{font-size:1.25rem;margin-top:2rem;border-bottom:1px solid #ddd;padding-bottom:.3rem}
table{border-collapse:collapse;margin:.8rem 0;font-size:.88rem}th,td{border:1px solid #ccc;padding:.3rem .55rem;text-align:right}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}figure{margin:1rem 0}
figcaption{font-size:.85rem;color:#555}img{max-width:100%;height:auto;border:1px solid #eee}
.note{color:#555;font-size:.9rem}code{background:#f5f5f5;padding:0 .2rem}
.headline{border-left:4px solid #4c72b0;background:#f6f8fb;padding:.4rem 1rem;margin:1rem 0}
.headline p{margin:.35rem 0}.warning{color:#8a4b00;font-weight:600}
"""
_SCRIPT = """
window.addEventListener('load', function () {
  var imgs = Array.prototype.slice.call(document.images);
  document.body.setAttribute('data-images', imgs.length);
  document.body.setAttribute('data-decoded', imgs.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length);
  document.body.setAttribute('data-table-rows', document.querySelectorAll('tbody tr').length);
});
"""


def esc(v) -> str:
    return html.escape(str(v))


def table(head: list[str], rows: Iterable[list], caption: str | None = None) -> str:
    out = ["<table>"]
    if caption:
        out.append(f"<caption>{esc(caption)}</caption>")
    out.append("<thead><tr>" + "".join(f"<th>{esc(h)}</th>" for h in head) + "</tr></thead><tbody>")
    for r in rows:
        out.append("<tr>" + "".join(f"<td>{esc(c)}</td>" for c in r) + "</tr>")
    out.append("</tbody></table>")
    return "\n".join(out)


def figure_png(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return buf.getvalue()


def img(png: bytes, alt: str, caption: str | None = None) -> str:
    data = base64.b64encode(png).decode("ascii")
    cap = f"<figcaption>{esc(caption)}</figcaption>" if caption else ""
    return f'<figure><img alt="{esc(alt)}" src="data:image/png;base64,{data}">{cap}</figure>'


def page(title: str, body: list[str]) -> str:
    return (f"<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>{esc(title)}</title>"
            f"<style>{_CSS}</style><script>{_SCRIPT}</script></head><body>\n<h1>{esc(title)}</h1>\n"
            + "\n".join(body) + "\n</body></html>\n")


def pyplot():
    """matplotlib's pyplot on the file-only Agg backend (no display needed)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt
