"""The Explore page: a static site made from an adapter index (`adapter hub site`).

Plain files that work from ``file://`` and any static host, with nothing fetched at view time:

* ``index.html``: counts, and filters by task, data set, base model, method family and method
  plus a text search over ids, names and descriptions (``assets/explore.js``, plain JavaScript;
  the filters are mirrored in the URL, ``?task=sentiment&method=lora``, so a view can be linked);
* ``adapters/<task>--<dataset>--<org>--<model>_<method>.html``, one per descriptor: the model
  card, metrics, method and config, parameters and file sizes, files with their sha256 and where
  they live, and the exact lines that load it (Python, a recipe's ``adapter.load``, the CLI);
* ``tasks/<task>.html``: the task's adapters side by side and, per metric, an SVG of the metric
  against the adapter's parameter count, drawn here at build time.

Pages are Jinja2 templates (``adaptercli/templates``) filled from the descriptors. The index is
checked first (`index_checks.require_valid`: a broken index builds nothing), the site is written
to a temporary folder beside ``out`` and then moved into place, so ``out`` is never half a site.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import math
import os
import re
import secrets
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import yaml

from .errors import AdapterCliError
from .hub import HubError, download
from .index import Descriptor, find, index_kind, open_index, safetensors_parameters
from .index_checks import require_valid
from .methods import get_method

TEMPLATES = Path(__file__).parent / "templates"
MARKER = ".adaptercli-site"  # marks a folder this command wrote, which it may replace
FACETS = (("task", "task", "tasks"), ("dataset", "data set", "data sets"), ("model", "base model", "base models"),
          ("family", "method family", "method families"), ("method", "method", "methods"))
FAMILY_COLOURS = {"bottleneck": "#1b6ac9", "lora": "#d9480f", "prefix_tuning": "#2b8a3e", "prompt_tuning": "#862e9c",
                  "reft": "#c2255c", "union": "#5c7cfa"}


@dataclasses.dataclass
class FileRow:
    name: str
    size: int | None
    sha256: str
    where: str
    href: str | None = None  # the file on the Hub, when it lives there


@dataclasses.dataclass
class Entry:
    """One adapter as the site shows it."""

    descriptor: Descriptor
    slug: str
    family: str
    base_model: str
    parameters: int | None
    head_parameters: int | None
    size: int | None
    files: list[FileRow]
    python: str = ""
    recipe: str = ""
    command: str = ""
    card: str | None = None  # the model card's text as HTML (no raw HTML, no images)
    split: str | None = None
    descriptor_file: str = ""

    @property
    def facets(self) -> dict[str, str]:
        d = self.descriptor
        return {"task": d.task, "dataset": d.dataset, "model": self.base_model, "family": self.family, "method": d.method}

    @property
    def search_text(self) -> str:
        d = self.descriptor
        return " ".join([d.id, d.name, d.description, self.base_model, d.method, self.family]).lower()


@dataclasses.dataclass
class Site:
    out: Path
    adapters: int
    pages: int
    notes: list[str]  # files that could not be checked (a Hub repository while offline)


def build_site(index: str, out: str | Path, *, index_url: str | None = None, title: str = "Explore adapters") -> Site:
    """Check the index ``index`` (a folder, git URL or ``hf:...``) and write its site to ``out``.
    ``index_url``: how the load lines name the index (default: ``index``, a folder made absolute)."""
    out = Path(out).expanduser()
    _check_out(out)
    folder = open_index(index)
    report = require_valid(folder)
    spec = index_url or (str(Path(index).expanduser().resolve()) if index_kind(index) == "folder" else index)
    entries = [_entry(d, folder, report.descriptors, spec) for d in report.descriptors]
    entries.sort(key=lambda e: (e.descriptor.task, e.descriptor.id, e.base_model, e.descriptor.method))
    taken = Counter(e.slug for e in entries)
    for entry in entries:  # two files whose names flatten alike keep apart
        if taken[entry.slug] > 1:
            entry.slug += "-" + hashlib.sha256(str(entry.descriptor.path).encode()).hexdigest()[:8]
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}-", dir=out.parent))
    try:
        pages = _render(staging, entries, title=title, index_label=spec)
        _move_into_place(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return Site(out, len(entries), pages, report.notes)


def _check_out(out: Path) -> None:
    if out.is_file() or (out.is_dir() and any(out.iterdir()) and not (out / MARKER).is_file()):
        raise AdapterCliError(f"--out: {out} holds files that `adapter hub site` did not write; choose an empty "
                              "or new folder (a site it wrote before is replaced)")


def _move_into_place(staging: Path, out: Path) -> None:
    """``staging`` becomes ``out``; a site already there is replaced, never mixed with the new one."""
    os.chmod(staging, 0o755)  # mkdtemp makes it private; a site is for reading
    if not out.exists():
        staging.rename(out)
        return
    old = out.with_name(f".{out.name}-old-{secrets.token_hex(4)}")
    out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)


# -- what a page shows --------------------------------------------------------------------------

def slug_of(descriptor: Descriptor) -> str:
    """The page name of a descriptor: its place in the index, flattened to a plain file name."""
    stem = descriptor.path.stem if descriptor.path else f"{descriptor.model.get('type')}_{descriptor.method}"
    return re.sub(r"[^\w.-]+", "-", f"{descriptor.task}--{descriptor.dataset}--{descriptor.org}--{stem}")


def _entry(d: Descriptor, folder: Path, everything: list[Descriptor], spec: str) -> Entry:
    files, at = _files(d, folder)
    parameters = dict(d.parameters)
    for part in ("adapter", "head"):  # an older descriptor without counts: read them from the files
        if part not in parameters and at is not None and (at / f"{part}.safetensors").is_file():
            parameters[part] = safetensors_parameters(at / f"{part}.safetensors")
    sizes = [f.size for f in files]
    entry = Entry(d, slug_of(d), get_method(d.method).family.name, str(d.model.get("name")),
                  parameters.get("adapter"), parameters.get("head"),
                  sum(s for s in sizes if s is not None) if None not in sizes else None, files,
                  descriptor_file=d.path.relative_to(folder).as_posix() if d.path else "")
    entry.python, entry.recipe, entry.command = load_lines(d, everything, spec)
    entry.card, entry.split = _card(d, at)
    return entry


def load_lines(d: Descriptor, everything: list[Descriptor], spec: str) -> tuple[str, str, str]:
    """The lines that load ``d``: Python, a recipe, the CLI. ``method=`` is named when the index
    has other adapters with the same id for the same kind of model (else the id alone picks it)."""
    base, quote = d.model.get("name"), json.dumps  # a Python string literal, whatever the path holds
    fitting = find(everything, d.id, model_type=d.model.get("type"), hidden_size=d.model.get("hidden_size"))
    method = f", method={quote(d.method)}" if len(fitting) > 1 else ""
    python = (f"import adaptercli\n\nmodel = adaptercli.AutoAdapterModel.from_pretrained({quote(base)})\n"
              f"model.load_adapter({quote(d.id)}, index={quote(spec)}{method}, set_active=True)\nmodel.eval()")
    recipe = f"# run with ADAPTERCLI_INDEX={spec}\n" + yaml.safe_dump(
        {"model": {"name_or_path": base}, "adapter": {"name": d.name, "load": d.id}}, sort_keys=False).rstrip()
    if method:
        recipe += ("\n# The index has several adapters with this id for this model; a recipe's adapter.load\n"
                   "# cannot choose among them: load it in Python with method= (above).")
    command = f"adapter hub show {d.id} --index {spec}"
    return python, recipe, command


def _files(d: Descriptor, folder: Path) -> tuple[list[FileRow], Path | None]:
    """The descriptor's files (size as recorded, else as found) and the local folder holding them, if any."""
    files, sizes = d.files, d.files.get("size") or {}
    at = None if files.get("repo") else ((d.path or folder).parent / files["path"]).resolve()
    rows = []
    for name, digest in sorted(files["sha256"].items()):
        size = sizes.get(name)
        if size is None and at is not None and (at / name).is_file():
            size = (at / name).stat().st_size
        if at is not None:
            rows.append(FileRow(name, size, digest, f"index: {(at / name).relative_to(folder.resolve()).as_posix()}"))
        else:
            from huggingface_hub import constants

            revision = files.get("revision") or "main"
            rows.append(FileRow(name, size, digest, f"Hub: {files['repo']}@{revision}",
                                f"{constants.ENDPOINT}/{files['repo']}/blob/{revision}/{name}"))
    return rows, at


def _card(d: Descriptor, at: Path | None) -> tuple[str | None, str | None]:
    """The model card (``README.md`` beside the files, or in their Hub repository) as HTML, and the
    split its evaluation was on."""
    if at is None:
        try:
            at = download(d.files["repo"], d.files.get("revision"), allow_patterns=["README.md"])[0]
        except HubError:
            return None, None
    path = at / "README.md"
    if not path.is_file():
        return None, None
    text = path.read_text(errors="replace")
    front: dict[str, Any] = {}
    if text.startswith("---"):
        head, _, text = text[3:].partition("\n---")
        try:
            front = yaml.safe_load(head) or {}
        except yaml.YAMLError:
            front = {}
        text = text.lstrip("-\n")
    try:
        split = front["model-index"][0]["results"][0]["dataset"]["split"]
    except (KeyError, IndexError, TypeError):
        split = None
    return _markdown(text), split


def _markdown(text: str) -> str:
    """Markdown as HTML: no raw HTML, no images (nothing loads at view time), only web links."""
    from markdown_it import MarkdownIt

    md = MarkdownIt("commonmark", {"html": False}).enable("table").disable("image")
    md.validateLink = lambda url: url.lower().startswith(("http://", "https://", "mailto:"))
    return md.render(text)


# -- the comparison plots -----------------------------------------------------------------------

@dataclasses.dataclass
class Plot:
    """One SVG: a metric (y) against adapter parameters (x), in SVG coordinates."""

    metric: str
    points: list[dict[str, Any]]
    x_ticks: list[tuple[float, str]]
    y_ticks: list[tuple[float, str]]
    log_x: bool
    families: list[tuple[str, str]]
    left_out: list[str]
    width: int = 640
    height: int = 360
    margin: tuple[int, int, int, int] = (20, 130, 50, 70)  # top, right, bottom, left


def plots_for(entries: list[Entry]) -> list[Plot]:
    """One plot per metric the task's adapters report, the most reported first; the loss only
    where they report nothing else."""
    metrics = Counter(k for e in entries for k in e.descriptor.metrics)
    order = sorted(metrics, key=lambda k: (-metrics[k], k))
    return [_plot(entries, metric) for metric in [k for k in order if "loss" not in k] or order]


def _plot(entries: list[Entry], metric: str) -> Plot:
    have = [e for e in entries if metric in e.descriptor.metrics and e.parameters]
    left_out = [e.descriptor.id for e in entries if metric in e.descriptor.metrics and not e.parameters]
    plot = Plot(metric, [], [], [], False, [], left_out)
    top, right, bottom, left = plot.margin
    width, height = plot.width - left - right, plot.height - top - bottom
    xs = [float(e.parameters or 0) for e in have]
    ys = [float(e.descriptor.metrics[metric]) for e in have]
    plot.log_x = bool(xs) and max(xs) / min(xs) >= 10
    x_lo, x_hi, x_ticks = _log_ticks(xs) if plot.log_x else _ticks([0.0, *xs])
    y_lo, y_hi, y_ticks = _ticks(ys)
    scale = math.log10 if plot.log_x else (lambda v: v)

    def to_x(v: float) -> float:
        return left + width * (scale(v) - scale(x_lo)) / ((scale(x_hi) - scale(x_lo)) or 1)

    def to_y(v: float) -> float:
        return top + height * (1 - (v - y_lo) / ((y_hi - y_lo) or 1))

    plot.x_ticks = [(round(to_x(t), 1), _short(t)) for t in x_ticks]
    plot.y_ticks = [(round(to_y(t), 1), f"{t:.4g}") for t in y_ticks]
    for e, x, y in zip(have, xs, ys, strict=True):
        plot.points.append({"x": round(to_x(x), 1), "y": round(to_y(y), 1), "slug": e.slug, "method": e.descriptor.method,
                            "colour": FAMILY_COLOURS.get(e.family, "#495057"), "value": y, "parameters": int(x),
                            "label": f"{e.descriptor.id} ({e.descriptor.method} on {e.base_model})"})
    plot.families = [(f, FAMILY_COLOURS.get(f, "#495057")) for f in sorted({e.family for e in have})]
    return plot


def _ticks(values: list[float], count: int = 5) -> tuple[float, float, list[float]]:
    """A range covering ``values`` with round tick marks (1, 2 or 5 times a power of ten apart)."""
    lo, hi = (min(values), max(values)) if values else (0.0, 1.0)
    if hi == lo:
        pad = abs(lo) * 0.05 or 0.05
        lo, hi = lo - pad, hi + pad
    raw = (hi - lo) / count
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 5, 10) if m * power >= raw)
    start, stop = math.floor(lo / step) * step, math.ceil(hi / step) * step
    ticks = [round(start + i * step, 10) for i in range(int(round((stop - start) / step)) + 1)]
    return ticks[0], ticks[-1], ticks


def _log_ticks(values: list[float]) -> tuple[float, float, list[float]]:
    lo, hi = math.floor(math.log10(min(values))), math.ceil(math.log10(max(values)))
    hi = max(hi, lo + 1)
    return 10.0 ** lo, 10.0 ** hi, [10.0 ** p for p in range(lo, hi + 1)]


def _short(value: float) -> str:
    for size, suffix in ((1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


# -- writing the pages --------------------------------------------------------------------------

def _environment():
    import jinja2

    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATES), autoescape=True, trim_blocks=True,
                             lstrip_blocks=True, undefined=jinja2.StrictUndefined)
    env.filters["thousands"] = lambda n: "—" if n is None else f"{n:,}"
    env.filters["filesize"] = _filesize
    env.filters["metric"] = lambda v: f"{float(v):.4f}"
    env.filters["yaml"] = lambda data: yaml.safe_dump(data, sort_keys=False, allow_unicode=True).rstrip()
    return env


def _filesize(size: int | None) -> str:
    if size is None:
        return "—"
    for unit, scale in (("MB", 1e6), ("kB", 1e3)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size} B"


def _render(out: Path, entries: list[Entry], *, title: str, index_label: str) -> int:
    """Write every page and the assets into ``out``; returns the number of pages."""
    env = _environment()
    tasks = sorted(Counter(e.descriptor.task for e in entries).items())
    common = {"site_title": title, "index_label": index_label, "tasks": tasks,
              "built": datetime.date.today().isoformat()}
    facets = [(key, label, plural, sorted(Counter(e.facets[key] for e in entries).items()))
              for key, label, plural in FACETS]
    counts = {"adapters": len(entries), "orgs": len({e.descriptor.org for e in entries})}
    pages = {"index.html": env.get_template("index.html").render(
        root="", entries=entries, facets=facets, counts=counts, **common)}
    for entry in entries:
        pages[f"adapters/{entry.slug}.html"] = env.get_template("adapter.html").render(root="../", e=entry, **common)
    for task, _ in tasks:
        chosen = [e for e in entries if e.descriptor.task == task]
        metrics = sorted({k for e in chosen for k in e.descriptor.metrics}, key=lambda k: ("loss" in k, k))
        pages[f"tasks/{task}.html"] = env.get_template("task.html").render(
            root="../", task=task, entries=chosen, metrics=metrics, plots=plots_for(chosen), **common)
    for name, text in pages.items():
        (out / name).parent.mkdir(parents=True, exist_ok=True)
        (out / name).write_text(text, encoding="utf-8")
    shutil.copytree(TEMPLATES / "assets", out / "assets")
    (out / MARKER).write_text("written by `adapter hub site`; the next run replaces this folder\n")
    return len(pages)
