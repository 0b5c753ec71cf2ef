"""The build report: ``report.html`` (self-contained) and ``report.md`` beside ``build.json``.

    html_path, md_path = write_report(Path("artifacts/builds/tiny"))

Both are rendered from the build's ``build.json`` alone (plus the images it
names), so a report can be remade for any finished build. The HTML needs no
network: CSS is inline and images are data URIs, so it survives being mailed
or attached to a CI run. The Markdown links images by their path relative to
the build folder.

Images a build may name in ``build.json`` (paths absolute or relative to the
build folder; a missing file is reported, not fatal):

- ``compression_plot``: a PNG path, at the top level or per component
  (``components.<name>.compression_plot``), e.g. the mixed-bit pre-analysis curve;
- ``sample_image``: a PNG path, or ``{"path": ..., "prompt": ..., "seed": ..., ...}``,
  or a list of either.
"""

from __future__ import annotations

import base64
import html
import json
from dataclasses import dataclass, field
from pathlib import Path

from sdbuild.errors import SdbuildError

# PSNR figures of verify, in the order a reader wants them, with what each compares.
PSNR_COLUMNS = (
    ("psnr_db", "shipped vs PyTorch fp32"),
    ("float16_psnr_db", "float16 package vs PyTorch fp32"),
    ("vs_float16_psnr_db", "shipped vs float16 package"),
    ("chain_psnr_db", "chained chunks vs whole (fp32)"),
    ("device_psnr_db", "Core ML on device vs PyTorch fp32"),
)
IDENTICAL_DB = 150.0  # a PSNR this high means zero error: rmse 0 gives 200 + 20·log10(peak)


def human_bytes(n: int | float | None) -> str:
    """``1.5 MB`` style sizes (powers of 1024), empty for None."""
    if n is None:
        return ""
    for unit in ("B", "KB", "MB", "GB"):
        if abs(n) < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@dataclass
class _Table:
    title: str
    columns: list[str]
    rows: list[list[str]]
    numeric: set[int] = field(default_factory=set)  # right-aligned column indexes
    css_id: str = ""
    note: str = ""
    failing: set[int] = field(default_factory=set)  # row indexes to mark as below the floor


@dataclass
class _Image:
    title: str
    path: Path
    caption: str = ""


def _read_build(build_dir: Path) -> dict:
    path = build_dir / "build.json"
    if not path.is_file():
        raise SdbuildError(f"{build_dir}: no build.json here; is this a build folder (artifacts/builds/<name>)?")
    try:
        return json.loads(path.read_text())
    except ValueError as e:
        raise SdbuildError(f"{path}: not readable JSON ({e})") from None


def compression_label(comp: dict | None) -> str:
    """A recipe's ``compression`` in words, e.g. ``50% sparse + 4-bit palettization (group 16, int8 palette)``."""
    if not comp:
        return "none (float16)"
    if comp.get("mixed_bit"):
        return f"mixed-bit {comp['mixed_bit'].get('recipe', '')}".strip()
    if comp.get("linear8"):
        return "linear 8-bit" + (" weights, int8 activations (W8A8)" if comp.get("activations") else "")
    sparsity = comp.get("sparsity")
    sparse = None if sparsity is None else (f"{sparsity} sparse" if isinstance(sparsity, str) else f"{sparsity:.0%} sparse")
    if comp.get("nbits") is None:
        return sparse or "none (float16)"
    details = [f"group {comp['group_size']}"] if comp.get("group_size") else []
    details += ["int8 palette"] if comp.get("lut_dtype") else []
    label = f"{comp['nbits']}-bit palettization" + (f" ({', '.join(details)})" if details else "")
    return f"{sparse} + {label}" if sparse else label


def _recipe_summary(recipe: dict) -> list[list[str]]:
    """The recipe fields a reader looks for first, as (field, value) rows."""
    model = recipe.get("model") or {}
    comp = recipe.get("compression")
    compression = compression_label(comp)
    if comp and comp.get("components"):
        compression += f" ({', '.join(comp['components'])})"
    res = recipe.get("resolution")
    resolutions = res if isinstance(res, list) else [res] if res else []
    chunk = recipe.get("chunk")
    rows = [
        ["model", f"{model.get('version', '')}" + (f" @ {model['revision']}" if model.get("revision") not in (None, "main") else "")],
        ["attention", str(recipe.get("attention", ""))],
        ["resolution", ", ".join(f"{r['width']}×{r['height']}" for r in resolutions)],
        ["target", str(recipe.get("target", ""))],
        ["compute unit", str(recipe.get("compute_unit", ""))],
        ["compression", compression],
        ["chunks", ", ".join(f"{k}: {v}" for k, v in chunk.items()) if chunk else "not chunked"],
        ["bundle layout", str((recipe.get("bundle") or {}).get("layout", ""))],
        ["PSNR floor", f"{(recipe.get('verify') or {}).get('psnr_min_db', '')} dB"],
    ]
    if recipe.get("controlnet"):
        rows.append(["ControlNets", ", ".join(recipe["controlnet"])])
    return rows


def _stage_table(build: dict) -> _Table:
    rows = []
    for s in build.get("stages", []):
        built = s.get("cache") == "miss"
        rows.append(
            [
                s["stage"],
                s.get("component") or "",
                {"miss": "built", "hit": "cached", "remote": "remote cache"}.get(s.get("cache"), str(s.get("cache"))),
                f"{s.get('seconds', 0.0):.1f}" if built else "",
                f"{s['build_seconds']:.1f}" if s.get("build_seconds") is not None else "",
                human_bytes(s.get("peak_rss_bytes")) if built else "",
                human_bytes(s.get("bytes")),
            ]
        )
    return _Table(
        "Stages",
        ["stage", "component", "cache", "seconds", "built in (s)", "peak RSS", "output"],
        rows,
        numeric={3, 4, 5, 6},
        css_id="stages",
        note="seconds and peak RSS are this run's, for stages it built; 'built in' is the time the cached output took when it was made.",
    )


def _size_table(build: dict) -> _Table:
    rows = []
    for name, c in build.get("components", {}).items():
        before, after = c.get("float16_bytes"), c.get("package_bytes")
        ratio = f"{after / before:.0%}" if before and after is not None else ""
        chunks = c.get("chunks") or {}
        parts = chunks.get("parts") or []
        rows.append(
            [
                name,
                human_bytes(before),
                human_bytes(after),
                ratio,
                "yes" if c.get("compressed") else "no",
                " + ".join(human_bytes(p.get("package_bytes", p.get("weight_bytes"))) for p in parts) if parts else "",
            ]
        )
    return _Table(
        "Sizes",
        ["component", "float16", "shipped", "shipped / float16", "compressed", "chunk packages"],
        rows,
        numeric={1, 2, 3},
        css_id="sizes",
    )


def _psnr_table(build: dict) -> _Table:
    components = build.get("components", {})
    present = [(key, label) for key, label in PSNR_COLUMNS if any(key in (c.get("psnr") or {}) for c in components.values())]
    floor = ((build.get("recipe") or {}).get("verify") or {}).get("psnr_min_db")
    rows, failing = [], []
    # With several resolutions, each function's row follows its component's (the worst of them).
    entries = [
        (label, c, psnr)
        for name, c in components.items()
        for label, psnr in [(name, c.get("psnr") or {})]
        + [(f"{name} {f}", p) for f, p in (c.get("psnr_by_function") or {}).items()]
    ]
    for name, c, psnr in entries:
        psnr = dict(psnr)
        row = [name]
        for key, _ in present:
            if key in psnr:
                # The formula's 1e-10 floor puts zero error near 200 dB: say so instead.
                row.append(f"{psnr[key]:.1f}" + (" (identical)" if psnr[key] >= IDENTICAL_DB else ""))
            elif key == "float16_psnr_db" and not c.get("compressed") and "psnr_db" in psnr:
                row.append(f"{psnr['psnr_db']:.1f}")  # an uncompressed component ships the float16 package itself
            elif key == "vs_float16_psnr_db" and not c.get("compressed"):
                row.append("same package")
            else:
                row.append("–")
        if floor is not None and psnr.get("psnr_db", float("inf")) < floor:
            failing.append(len(rows))
        rows.append(row)
    note = "PSNR in dB, the contract's formula; the lowest over verify's samples."
    if floor is not None:
        note += f" The build fails below {floor:g} dB against PyTorch."
    return _Table(
        "PSNR",
        ["component"] + [label for _, label in present],
        rows,
        numeric=set(range(1, len(present) + 1)),
        css_id="psnr",
        note=note,
        failing=set(failing),
    )


def _chunk_tables(build: dict) -> list[_Table]:
    tables = []
    for name, c in build.get("components", {}).items():
        chunks = c.get("chunks")
        if not chunks:
            continue
        rows = []
        for i, part in enumerate(chunks.get("parts") or [], start=1):
            crossing = chunks.get("crossing") or []
            after = crossing[i - 1] if i - 1 < len(crossing) else []
            rows.append(
                [
                    f"chunk {i}",
                    human_bytes(part.get("weight_bytes")),
                    human_bytes(part.get("package_bytes")),
                    ", ".join(_crossing_name(t) for t in after) if i <= len(crossing) else "(last part)",
                ]
            )
        tables.append(
            _Table(f"Chunks of {name}", ["part", "weights", "package", "tensors crossing the cut after it"], rows, numeric={1, 2}, css_id=f"chunks-{name}")
        )
    return tables


def _crossing_name(t) -> str:
    if isinstance(t, dict):
        shape = "×".join(str(d) for d in t.get("shape", []))
        return f"{t.get('name')} [{shape}]" if shape else str(t.get("name"))
    return str(t)


def _images(build: dict, build_dir: Path) -> tuple[list[_Image], list[str]]:
    """The images build.json names, resolved; and a note for each one that is missing."""
    found, missing = [], []

    def add(title: str, entry) -> None:
        if not entry:
            return
        if isinstance(entry, list):
            for e in entry:
                add(title, e)
            return
        info = entry if isinstance(entry, dict) else {"path": entry}
        path = Path(info["path"])
        path = path if path.is_absolute() else build_dir / path
        caption = ", ".join(f"{k}: {v}" for k, v in info.items() if k != "path")
        if path.is_file():
            found.append(_Image(title, path, caption))
        else:
            missing.append(f"{title}: {info['path']} is missing")

    add("Compression", build.get("compression_plot"))
    for name, c in build.get("components", {}).items():
        add(f"Compression of {name}", c.get("compression_plot"))
    add("Sample image", build.get("sample_image"))
    return found, missing


def _facts(build: dict, build_dir: Path) -> dict:
    images, missing = _images(build, build_dir)
    return {
        "title": f"sdbuild report: {build.get('name', build_dir.name)}",
        "summary": [
            ["recipe file", str(build.get("recipe_file", ""))],
            ["family", str(build.get("family", ""))],
            ["built on", str(build.get("platform", ""))],
            ["sdbuild", str(build.get("sdbuild", ""))],
            ["run time", f"{build.get('seconds', 0):.1f} s"],
            ["bundle size", human_bytes(build.get("bundle_bytes"))],
        ],
        "recipe": _recipe_summary(build.get("recipe") or {}),
        "recipe_json": json.dumps(build.get("recipe") or {}, indent=2),
        "tables": [_stage_table(build), _size_table(build), _psnr_table(build), *_chunk_tables(build)],
        "images": images,
        "notes": list(build.get("notes", [])) + missing,
        "versions": [[k, str(v)] for k, v in (build.get("versions") or {}).items()],
    }


# --------------------------------------------------------------------------- HTML

_CSS = """
body { font: 14px/1.45 -apple-system, "Segoe UI", "DejaVu Sans", Helvetica, Arial, sans-serif; color: #1d1d1f;
       max-width: 1100px; margin: 24px auto; padding: 0 20px; background: #fbfbfd; }
h1 { font-size: 24px; margin: 0 0 4px; }
h2 { font-size: 17px; margin: 28px 0 8px; border-bottom: 1px solid #d2d2d7; padding-bottom: 4px; }
.sub { color: #6e6e73; margin-bottom: 16px; }
table { border-collapse: collapse; margin: 6px 0; background: #fff; }
th, td { border: 1px solid #d2d2d7; padding: 4px 10px; text-align: left; vertical-align: top; }
th { background: #f0f0f5; font-weight: 600; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.built { color: #b35c00; } td.cached { color: #1a7f37; }
tr.fail td { background: #fde8e8; color: #a4001d; }
.grid { display: flex; gap: 32px; flex-wrap: wrap; }
.note { color: #6e6e73; font-size: 12.5px; margin: 2px 0 0; }
ul.notes li { margin: 3px 0; }
figure { margin: 8px 0 16px; } figure img { max-width: 100%; border: 1px solid #d2d2d7; background: #fff; }
figcaption { color: #6e6e73; font-size: 12.5px; }
details pre { background: #fff; border: 1px solid #d2d2d7; padding: 8px; overflow-x: auto; font-size: 12px; }
"""


def _html_table(t: _Table) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in t.columns)
    body = []
    for r, row in enumerate(t.rows):
        cells = []
        for i, v in enumerate(row):
            cls = "num" if i in t.numeric else ("built" if v == "built" else "cached" if v == "cached" else "")
            cells.append(f'<td class="{cls}">{e(v)}</td>' if cls else f"<td>{e(v)}</td>")
        row_class = ' class="fail"' if r in t.failing else ""
        body.append(f"<tr{row_class}>{''.join(cells)}</tr>")
    table_id = f' id="{e(t.css_id)}"' if t.css_id else ""
    note = f'<p class="note">{e(t.note)}</p>' if t.note else ""
    return f"<h2>{e(t.title)}</h2>\n<table{table_id}><thead><tr>{head}</tr></thead>\n<tbody>{''.join(body)}</tbody></table>{note}\n"


def _kv_table(rows: list[list[str]], table_id: str) -> str:
    e = html.escape
    return f'<table id="{table_id}">' + "".join(f"<tr><th>{e(k)}</th><td>{e(v)}</td></tr>" for k, v in rows) + "</table>"


def _data_uri(path: Path) -> str:
    mime = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".svg": "image/svg+xml"}.get(path.suffix.lower(), "image/png")
    return f"data:{mime};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def render_html(facts: dict) -> str:
    e = html.escape
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(facts['title'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(facts['title'])}</h1>",
        f'<div class="sub">{e(" · ".join(v for k, v in facts["summary"] if k in ("built on", "run time", "bundle size")))}</div>',
        '<div class="grid"><div><h2>Recipe</h2>',
        _kv_table(facts["recipe"], "recipe"),
        "</div><div><h2>Build</h2>",
        _kv_table(facts["summary"], "summary"),
        "</div></div>",
        f"<details><summary>full recipe</summary><pre>{e(facts['recipe_json'])}</pre></details>",
    ]
    parts += [_html_table(t) for t in facts["tables"]]
    for image in facts["images"]:
        caption = f"<figcaption>{e(image.caption)}</figcaption>" if image.caption else ""
        parts.append(f'<h2>{e(image.title)}</h2><figure><img alt="{e(image.title)}" src="{_data_uri(image.path)}">{caption}</figure>')
    if facts["notes"]:
        parts.append('<h2>Notes</h2><ul class="notes">' + "".join(f"<li>{e(n)}</li>" for n in facts["notes"]) + "</ul>")
    if facts["versions"]:
        parts.append("<h2>Versions</h2>" + _kv_table(facts["versions"], "versions"))
    parts.append("</body></html>\n")
    return "\n".join(parts)


# --------------------------------------------------------------------------- Markdown


def _md_cell(v: str) -> str:
    return str(v).replace("|", "\\|").replace("\n", " ")


def _md_table(columns: list[str], rows: list[list[str]], numeric: set[int] = frozenset()) -> str:
    lines = ["| " + " | ".join(_md_cell(c) for c in columns) + " |"]
    lines.append("|" + "|".join("---:" if i in numeric else "---" for i in range(len(columns))) + "|")
    lines += ["| " + " | ".join(_md_cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def render_markdown(facts: dict, build_dir: Path) -> str:
    out = [f"# {facts['title']}", "", "## Recipe", "", _md_table(["field", "value"], facts["recipe"]), ""]
    out += ["## Build", "", _md_table(["", ""], facts["summary"]), ""]
    for t in facts["tables"]:
        out += [f"## {t.title}", "", _md_table(t.columns, t.rows, t.numeric), ""]
        if t.note:
            out += [f"_{t.note}_", ""]
    for image in facts["images"]:
        try:
            link = image.path.relative_to(build_dir).as_posix()
        except ValueError:
            link = image.path.as_posix()
        out += [f"## {image.title}", "", f"![{image.title}]({link})", ""]
        if image.caption:
            out += [f"_{image.caption}_", ""]
    if facts["notes"]:
        out += ["## Notes", ""] + [f"- {n}" for n in facts["notes"]] + [""]
    if facts["versions"]:
        out += ["## Versions", "", _md_table(["library", "version"], facts["versions"]), ""]
    out += ["<details><summary>full recipe</summary>", "", "```json", facts["recipe_json"], "```", "", "</details>", ""]
    return "\n".join(out)


def write_report(build_dir: Path) -> tuple[Path, Path]:
    """Write ``report.html`` and ``report.md`` into ``build_dir`` from its ``build.json``.

    Returns (html path, markdown path). Raises SdbuildError when
    ``build_dir`` holds no readable build.json.
    """
    build_dir = Path(build_dir)
    build = _read_build(build_dir)
    facts = _facts(build, build_dir)
    html_path, md_path = build_dir / "report.html", build_dir / "report.md"
    for path, text in ((html_path, render_html(facts)), (md_path, render_markdown(facts, build_dir))):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)  # whole or not at all
    return html_path, md_path
