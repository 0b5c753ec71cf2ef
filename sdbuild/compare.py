"""The variant comparison page: several finished builds side by side, in one self-contained HTML file.

    html_path = write_compare([Path("artifacts/builds/a"), Path("artifacts/builds/b")], Path("compare.html"))

Read from each build's ``build.json`` (and the sample image it names), as the
build report is. Per variant: compression, bundle bytes, bytes and PSNR per
component, verify status and the sample image; then a size-vs-PSNR chart
(inline SVG) with the Pareto front marked: the variants no other variant beats
on both size and PSNR.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path

from sdbuild.errors import SdbuildError
from sdbuild.report import IDENTICAL_DB, _CSS, _data_uri, _read_build, compression_label, human_bytes


@dataclass
class Variant:
    """One build's figures, as the page shows them."""

    name: str
    folder: Path
    compression: str
    bundle_bytes: int | None
    component_bytes: dict[str, int | None]
    psnr: dict[str, float]  # component -> shipped vs PyTorch fp32 (dB)
    floor: float | None
    sample: dict | None  # {"path": Path, "prompt": ..., "seed": ...}
    chart_psnr: float | None = None

    @property
    def verify_status(self) -> str:
        if not self.psnr:
            return "not verified"
        worst = min(self.psnr, key=self.psnr.get)
        if self.floor is not None and self.psnr[worst] < self.floor:
            return f"below floor: {worst} {self.psnr[worst]:.1f} dB < {self.floor:g} dB"
        return "passed" + (f" (≥ {self.floor:g} dB)" if self.floor is not None else "")


def load_variant(folder: Path) -> Variant:
    """A build folder's figures; SdbuildError when it holds no build.json."""
    folder = Path(folder)
    build = _read_build(folder)
    recipe = build.get("recipe") or {}
    components = build.get("components") or {}
    sample = build.get("sample_image")
    if isinstance(sample, list):
        sample = sample[0] if sample else None
    if sample is not None:
        sample = dict(sample) if isinstance(sample, dict) else {"path": sample}
        path = Path(sample["path"])
        sample["path"] = path if path.is_absolute() else folder / path
    return Variant(
        name=str(build.get("name", folder.name)),
        folder=folder,
        compression=compression_label(recipe.get("compression")),
        bundle_bytes=build.get("bundle_bytes"),
        component_bytes={name: c.get("package_bytes") for name, c in components.items()},
        psnr={name: float(c["psnr"]["psnr_db"]) for name, c in components.items() if "psnr_db" in (c.get("psnr") or {})},
        floor=(recipe.get("verify") or {}).get("psnr_min_db"),
        sample=sample,
    )


def chart_components(variants: list[Variant]) -> list[str]:
    """Components the chart's PSNR is taken over: those any variant compresses (all, if none does)."""
    compressed: set[str] = set()
    for v in variants:
        build = _read_build(v.folder)
        compressed |= {name for name, c in (build.get("components") or {}).items() if c.get("compressed")}
    every = [name for v in variants for name in v.psnr]
    ordered = list(dict.fromkeys(every))
    return [name for name in ordered if name in compressed] or ordered


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indexes of the points no other point beats: smaller or equal size and higher or equal PSNR, one strictly.

    ``points`` are (size, psnr); the result is ordered by size.
    """
    front = []
    for i, (size, psnr) in enumerate(points):
        beaten = any(
            (s <= size and p >= psnr) and (s < size or p > psnr) for j, (s, p) in enumerate(points) if j != i
        )
        if not beaten:
            front.append(i)
    return sorted(front, key=lambda i: (points[i][0], -points[i][1]))


# --------------------------------------------------------------------------- HTML

_COMPARE_CSS = """
table#variants td, table#variants th { min-width: 120px; }
td.pass { color: #1a7f37; } td.fail { color: #a4001d; background: #fde8e8; }
figure.sample img { width: 160px; image-rendering: pixelated; }
svg text { font: 11px "DejaVu Sans", Helvetica, Arial, sans-serif; fill: #1d1d1f; }
"""


def _psnr_text(db: float | None) -> str:
    if db is None:
        return "–"
    return f"{db:.1f}" + (" (identical)" if db >= IDENTICAL_DB else "")


def _variants_table(variants: list[Variant]) -> str:
    e = html.escape
    components = list(dict.fromkeys(name for v in variants for name in v.component_bytes))
    rows: list[tuple[str, list[str], str]] = [
        ("compression", [v.compression for v in variants], ""),
        ("bundle", [human_bytes(v.bundle_bytes) for v in variants], "num"),
        ("bundle bytes", [str(v.bundle_bytes) if v.bundle_bytes is not None else "–" for v in variants], "num"),
    ]
    rows += [(f"{c} bytes", [str(v.component_bytes[c]) if v.component_bytes.get(c) is not None else "–" for v in variants], "num") for c in components]
    rows += [(f"{c} PSNR (dB)", [_psnr_text(v.psnr.get(c)) for v in variants], "num") for c in components]
    head = "<th>variant</th>" + "".join(f"<th>{e(v.name)}</th>" for v in variants)
    body = []
    for label, cells, cls in rows:
        tds = "".join(f'<td class="{cls}">{e(x)}</td>' if cls else f"<td>{e(x)}</td>" for x in cells)
        body.append(f"<tr><th>{e(label)}</th>{tds}</tr>")
    status = "".join(
        f'<td class="{"pass" if v.verify_status.startswith("passed") else "fail"}">{e(v.verify_status)}</td>' for v in variants
    )
    body.append(f"<tr><th>verify</th>{status}</tr>")
    samples = []
    for v in variants:
        if v.sample and Path(v.sample["path"]).is_file():
            samples.append(f'<td><figure class="sample"><img alt="sample of {e(v.name)}" src="{_data_uri(Path(v.sample["path"]))}"></figure></td>')
        else:
            samples.append("<td>no sample image</td>")
    body.append(f"<tr><th>sample image</th>{''.join(samples)}</tr>")
    return f'<table id="variants"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _sample_note(variants: list[Variant]) -> str:
    """One line on the samples' prompt and seed, or why they are not comparable."""
    settings = {
        (str(v.sample.get("prompt")), str(v.sample.get("seed")), str(v.sample.get("steps")))
        for v in variants
        if v.sample
    }
    if not settings:
        return "No variant has a sample image (set verify.sample_image: true)."
    if len(settings) > 1:
        return "The samples differ in prompt, seed or steps: compare them with care."
    prompt, seed, steps = settings.pop()
    return f"Every sample: prompt “{prompt}”, seed {seed}, {steps} steps."


def _chart(variants: list[Variant], over: list[str]) -> str:
    """An inline SVG scatter of bundle size (MB) against PSNR, the Pareto front joined and ringed."""
    e = html.escape
    plotted = [v for v in variants if v.bundle_bytes is not None and v.chart_psnr is not None]
    if not plotted:
        return "<p>No variant has both a bundle size and a PSNR to plot.</p>"
    points = [(v.bundle_bytes / 2**20, min(v.chart_psnr, IDENTICAL_DB)) for v in plotted]
    front = pareto_front(points)
    width, height, pad = 640, 360, 56
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    x0, x1 = (x0 - 0.5, x1 + 0.5) if x1 - x0 < 1e-9 else (x0 - 0.08 * (x1 - x0), x1 + 0.08 * (x1 - x0))
    y0, y1 = (y0 - 1, y1 + 1) if y1 - y0 < 1e-9 else (y0 - 0.1 * (y1 - y0), y1 + 0.1 * (y1 - y0))

    def sx(x):
        return pad + (x - x0) / (x1 - x0) * (width - 2 * pad)

    def sy(y):
        return height - pad - (y - y0) / (y1 - y0) * (height - 2 * pad)

    parts = [f'<svg id="chart" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" viewBox="0 0 {width} {height}">']
    parts.append(f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff" stroke="#d2d2d7"/>')
    parts.append(f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" stroke="#6e6e73"/>')
    parts.append(f'<line x1="{pad}" y1="{pad}" x2="{pad}" y2="{height - pad}" stroke="#6e6e73"/>')
    for i in range(5):
        xv, yv = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
        parts.append(f'<text x="{sx(xv):.1f}" y="{height - pad + 16}" text-anchor="middle">{xv:.2f}</text>')
        parts.append(f'<text x="{pad - 6}" y="{sy(yv) + 4:.1f}" text-anchor="end">{yv:.1f}</text>')
    parts.append(f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">bundle size (MB)</text>')
    parts.append(f'<text x="14" y="{height / 2}" text-anchor="middle" transform="rotate(-90 14 {height / 2})">PSNR (dB), lowest of {e(", ".join(over))}</text>')
    line = " ".join(f"{sx(points[i][0]):.1f},{sy(points[i][1]):.1f}" for i in front)
    parts.append(f'<polyline id="pareto" points="{line}" fill="none" stroke="#d63384" stroke-width="2"/>')
    for i, (v, (x, y)) in enumerate(zip(plotted, points)):
        on = i in front
        parts.append(
            f'<circle class="variant{" pareto" if on else ""}" data-name="{e(v.name)}" data-bytes="{v.bundle_bytes}" '
            f'data-psnr="{v.chart_psnr:.2f}" cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="{7 if on else 5}" '
            f'fill="{"#d63384" if on else "#0071e3"}" stroke="#1d1d1f" stroke-width="{1.5 if on else 0.5}"/>'
        )
        parts.append(f'<text x="{sx(x) + 9:.1f}" y="{sy(y) - 7:.1f}">{e(v.name)}</text>')
    parts.append("</svg>")
    return "".join(parts)


def render_compare(variants: list[Variant]) -> str:
    """The comparison page's HTML."""
    e = html.escape
    over = chart_components(variants)
    for v in variants:
        figures = [v.psnr[c] for c in over if c in v.psnr]
        v.chart_psnr = min(figures) if figures else None
    plotted = [v for v in variants if v.bundle_bytes is not None and v.chart_psnr is not None]
    front = {plotted[i].name for i in pareto_front([(v.bundle_bytes, min(v.chart_psnr, IDENTICAL_DB)) for v in plotted])}
    title = f"sdbuild: {len(variants)} variants compared"
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}{_COMPARE_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<div class="sub">{e(", ".join(v.name for v in variants))}</div>',
        "<h2>Variants</h2>",
        _variants_table(variants),
        f'<p class="note">{e(_sample_note(variants))} PSNR: shipped package vs PyTorch fp32, lowest over verify\'s samples.</p>',
        "<h2>Size and PSNR</h2>",
        _chart(variants, over),
        f'<p class="note" id="front">Pareto front (no other variant is both smaller and better): {e(", ".join(n for n in (v.name for v in variants) if n in front) or "none")}.</p>',
        "</body></html>\n",
    ]
    return "\n".join(parts)


def write_compare(build_dirs: list[Path], out: Path) -> Path:
    """Write the comparison page of ``build_dirs`` to ``out`` (whole or not at all); returns ``out``."""
    if not build_dirs:
        raise SdbuildError("compare: name at least one build folder (artifacts/builds/<name>)")
    variants = [load_variant(Path(d)) for d in build_dirs]
    names = [v.name for v in variants]
    if len(set(names)) != len(names):
        raise SdbuildError(f"compare: a build is named twice: {', '.join(sorted({n for n in names if names.count(n) > 1}))}")
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    tmp.write_text(render_compare(variants), encoding="utf-8")
    tmp.replace(out)
    return out
