"""`finetrack report`'s "Representations" section (the suites that compare each checkpoint with the base model),
from a run directory whose step files are written here by hand with known per-layer values: every heat-map cell is
traced back to the step file it came from (layer, step and exact value), the columns sit on the trajectory charts'
step axis, a null value is a grey "no value" cell, and a run without such suites gets no section."""

from __future__ import annotations

import json
import math
import os
import random
import re
from html.parser import HTMLParser
from itertools import pairwise
from pathlib import Path

import browser
import pytest
import yaml

from finetrack.report import write_report
from finetrack.report.heatmap import NO_VALUE

STEPS = [0, 4, 10, 12]  # uneven on purpose: a column's place must follow its step, not its index
LAYERS = [0, 1, 2]
NULL_CKA = (2, 10)  # (layer, step) whose CKA the step file holds as null
TRAJECTORY_AXIS = "optimizer step (0 = base model)"
SUITES = [
    {"name": "probe", "kind": "representation"},
    {"name": "persona", "kind": "direction"},
    {"name": "lora", "kind": "adapter"},
    {"name": "feats", "kind": "sae", "layer": 1},
]
# adapted modules (name, layer): two in layer 0, one in layer 2, the head outside the decoder layers
MODULES = [
    ("model.layers.0.self_attn.q_proj", 0),
    ("model.layers.0.self_attn.v_proj", 0),
    ("model.layers.2.mlp.up_proj", 2),
    ("lm_head", None),
]


def results(step: int, rng: random.Random) -> dict[str, dict]:
    """Each suite's block of eval/step-NNNNNN.json at `step`, with values no formula in the report could guess."""
    base = step == 0
    per_layer = {
        "layer": LAYERS,
        "shift": [0.0 if base else rng.uniform(0.01, 0.9) for _ in LAYERS],
        "shift_last": [0.0 if base else rng.uniform(0.01, 0.9) for _ in LAYERS],
        "cosine": [1.0 if base else rng.uniform(0.5, 0.999) for _ in LAYERS],
        "cosine_last": [1.0 if base else rng.uniform(0.5, 0.999) for _ in LAYERS],
        "cka": [None if (i, step) == NULL_CKA else 1.0 if base else rng.uniform(0.6, 0.999) for i in LAYERS],
        "cka_last": [1.0 if base else rng.uniform(0.6, 0.999) for _ in LAYERS],
    }
    ckas = [c for c in per_layer["cka"] if c is not None]
    top = max(LAYERS, key=lambda i: per_layer["shift"][i])
    representation = {
        "shift": per_layer["shift"][top],
        "shift_layer": top,
        "shift_last": max(per_layer["shift_last"]),
        "cosine": min(per_layer["cosine"]),
        "cka": min(ckas),
        "kl": 0.0 if base else rng.uniform(0.001, 0.2),
    }
    projection = [rng.uniform(-2, 2) for _ in LAYERS]
    base_projection = [0.5, -0.25, 1.5]
    direction_layers = {
        "layer": LAYERS,
        "projection": base_projection if base else projection,
        "shift": [0.0 if base else p - p0 for p, p0 in zip(projection, base_projection)],
        "separation": [0.8, 2.5, 1.2],
    }
    norms = [rng.uniform(0.05, 3) for _ in MODULES]
    adapter_modules = {
        "module": [] if base else [m for m, _ in MODULES],
        "layer": [] if base else [layer for _, layer in MODULES],
        "norm": [] if base else norms,
        "effective_rank": [] if base else [rng.uniform(1, 4) for _ in MODULES],
        "singular_values": [] if base else [[n] for n in norms],
        "rotation_deg": [] if base else [None if step == STEPS[1] else rng.uniform(0, 30) for _ in MODULES],
    }
    rotations = [x for x in adapter_modules["rotation_deg"] if x is not None]
    adapter = {
        "norm": 0.0 if base else math.sqrt(sum(n * n for n in norms)),
        "max_norm": 0.0 if base else max(norms),
        "effective_rank": None,
        "rotation_deg": sum(rotations) / len(rotations) if rotations else None,
        "max_rotation_deg": max(rotations, default=None),
    }
    changes = sorted(([0.0] * 5) if base else [rng.uniform(-1, 1) for _ in range(5)], key=abs, reverse=True)
    base_acts = [rng.uniform(0, 2) for _ in changes]
    features = {
        "feature": rng.sample(range(1000), len(changes)),
        "base": base_acts,
        "checkpoint": [b + c for b, c in zip(base_acts, changes)],
        "change": changes,
    }
    sae = {"max_change": abs(changes[0]), "mean_abs_change": sum(map(abs, changes)) / len(changes), "num_changed": 3, "reconstruction": 0.2}
    return {
        "probe": {"metrics": representation, "counts": {"prompts": 6, "tokens": 75, "layers": 3}, "layers": per_layer},
        "persona": {
            "metrics": {
                "projection": direction_layers["projection"][1],
                "shift": direction_layers["shift"][1],
                "layer": 1,
                "separation": 2.5,
            },
            "counts": {"positive": 4, "negative": 4, "prompts": 6},
            "layers": direction_layers,
        },
        "lora": {"metrics": adapter, "counts": {"modules": len(adapter_modules["module"])}, "modules": adapter_modules, "previous": None},
        "feats": {"metrics": sae, "counts": {"prompts": 6, "tokens": 75, "features": 64}, "features": features},
    }


def make_run(run_dir: Path, with_suites: bool = True, configured: bool = True, seed: int = 0) -> dict[int, dict]:
    """A run directory as `finetrack train` + `finetrack eval` leave it, for what the report reads: the resolved config,
    metrics.jsonl and one eval/step-NNNNNN.json per step. Returns step -> the suites' blocks written."""
    rng = random.Random(seed)
    (run_dir / "eval").mkdir(parents=True)
    config = {
        "model": {"name": "tiny", "method": "lora"},
        "eval": {"suites": [{"name": "heldout", "kind": "loss"}] + (SUITES if with_suites and configured else [])},
        "resolved": {"total_steps": {"value": STEPS[-1], "reason": "train.max_steps"}},
    }
    (run_dir / "config.resolved.yaml").write_text(yaml.safe_dump(config))
    lines = [{"step": s, "epoch": s / STEPS[-1], "loss": 2.0 - 0.1 * s} for s in range(1, STEPS[-1] + 1)]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(m) + "\n" for m in lines))
    written = {}
    for step in STEPS:
        blocks = results(step, rng) if with_suites else {}
        blocks["heldout"] = {"metrics": {"loss": 2.0 - 0.05 * step}, "counts": {}}
        flat = {f"{name}.{k}": v for name, b in blocks.items() for k, v in b["metrics"].items()}
        record = {"step": step, "checkpoint": None if step == 0 else f"checkpoints/step-{step:06d}", "epoch": step / 12}
        record |= {"fraction": step / 12, "last": step == STEPS[-1], "metrics": flat, "counts": {}, "suites": blocks}
        (run_dir / "eval" / f"step-{step:06d}.json").write_text(json.dumps(record))
        written[step] = blocks
    return written


class Page(HTMLParser):
    """Every <svg> of the page by section and aria-label: its elements (tag, attributes, the text of the <title> directly
    inside); each section's table cells; the header's links."""

    def __init__(self, html: str):
        super().__init__()
        self.section = ""
        self.svgs: dict[tuple[str, str], list[dict]] = {}
        self.cells: dict[str, list[list[str]]] = {}
        self.links: list[str] = []
        self._svg: list[dict] | None = None
        self._open: list[dict] = []
        self._row: list[str] | None = None
        self._cell: list[str] | None = None
        self.feed(html)

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.section = a.get("id", "")
        elif tag == "a" and "href" in a:
            self.links.append(a["href"])
        elif tag == "svg":
            self._svg = self.svgs.setdefault((self.section, a["aria-label"]), [])
        elif tag == "tr":
            self._row = []
            self.cells.setdefault(self.section, []).append(self._row)
        elif tag == "td":
            self._cell = []
        if self._svg is not None and tag != "svg":
            self._open.append({"tag": tag, "attrs": a, "title": "", "text": ""})

    def handle_startendtag(self, tag, attrs):
        if self._svg is not None:
            self._svg.append({"tag": tag, "attrs": dict(attrs), "title": "", "text": ""})

    def handle_endtag(self, tag):
        if tag == "svg":
            self._svg, self._open = None, []
        elif self._svg is not None and self._open:
            element = self._open.pop()
            if element["tag"] == "title" and self._open:
                self._open[-1]["title"] = element["text"]
            else:
                self._svg.append(element)
        if tag == "td" and self._cell is not None and self._row is not None:
            self._row.append("".join(self._cell).strip())
            self._cell = None

    def handle_data(self, data):
        if self._open:
            self._open[-1]["text"] += data
        if self._cell is not None:
            self._cell.append(data)

    def svg(self, section: str, label: str) -> list[dict]:
        """The elements of the one svg of `section` labelled `label` (or, failing that, labelled starting with it)."""
        found = [v for (s, lab), v in self.svgs.items() if s == section and lab == label]
        found = found or [v for (s, lab), v in self.svgs.items() if s == section and lab.startswith(label)]
        assert len(found) == 1, (section, label, [k for k in self.svgs if k[0] == section])
        return found[0]


CELL = re.compile(r"^layer (\d+), step (\d+): (?:no value|(\w+) (\S+))(?: \((.*)\))?$")


def cells(elements: list[dict]) -> dict[tuple[int, int], dict]:
    """(layer, step) -> the heat map's cell: its value read back from the hover text (None: "no value"), fill, span."""
    out = {}
    for e in elements:
        match = CELL.match(e["title"]) if e["tag"] == "rect" else None
        if match:
            layer, step, _, value, _ = match.groups()
            x, w = float(e["attrs"]["x"]), float(e["attrs"]["width"])
            out[(int(layer), int(step))] = {
                "value": None if value is None else float(value),
                "fill": e["attrs"]["fill"],
                "span": (x, x + w),
            }
    return out


def x_ticks(elements: list[dict]) -> list[tuple[float, str]]:
    return [(float(e["attrs"]["x"]), e["text"]) for e in elements if e["attrs"].get("class") == "xt"]


def step_x(ticks: list[tuple[float, str]]):
    """Where a step sits on an axis with these ticks (linear: from the first and last tick)."""
    (x0, v0), (x1, v1) = ticks[0], ticks[-1]
    return lambda step: x0 + (step - float(v0)) * (x1 - x0) / (float(v1) - float(v0))


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> tuple[dict[int, dict], Path, str, Page]:
    run = tmp_path_factory.mktemp("repr") / "run"
    written = make_run(run)
    path = write_report([run])
    html = path.read_text()
    return written, path, html, Page(html)


# ------------------------------------------------------------------------------------ heat maps
@pytest.mark.parametrize("key, label", [("shift", "shift:"), ("shift_last", "shift_last:"), ("cosine", "cosine:"), ("cka", "cka:")])
def test_representation_heat_map_traced_back_to_the_step_files(report, key, label):
    written, _, _, page = report
    found = cells(page.svg("representations", label))
    assert set(found) == {(i, s) for i in LAYERS for s in STEPS}
    for (layer, step), cell in found.items():
        expected = written[step]["probe"]["layers"][key][LAYERS.index(layer)]
        assert cell["value"] == expected, (layer, step)  # the exact float of the step file
        assert (cell["fill"] == NO_VALUE) == (expected is None)
    if key == "cka":
        assert found[NULL_CKA]["value"] is None and found[NULL_CKA]["fill"] == NO_VALUE
    values = {c["value"] for c in found.values() if c["value"] is not None}
    fills = {c["fill"] for c in found.values() if c["value"] is not None}
    assert len(fills) > len(values) // 2  # the colour follows the value (equal values share a colour)


def test_columns_sit_on_the_trajectory_charts_step_axis(report):
    _, _, _, page = report
    trajectory = page.svg("trajectory", "probe.shift")
    heat = page.svg("representations", "shift:")
    kl = page.svg("representations", "kl:")
    assert x_ticks(heat) == x_ticks(trajectory) == x_ticks(kl)  # the same ticks at the same places
    at = step_x(x_ticks(trajectory))
    markers = sorted(int(e["title"].removeprefix("evaluated: step ")) for e in heat if e["title"].startswith("evaluated: step"))
    assert markers == STEPS
    spans = {s: c["span"] for (layer, s), c in cells(heat).items() if layer == 0}
    for step in STEPS:
        assert spans[step][0] <= at(step) <= spans[step][1]
    for a, b in pairwise(STEPS):  # neighbouring columns meet halfway between their steps
        assert spans[a][1] == pytest.approx((at(a) + at(b)) / 2, abs=0.02) == pytest.approx(spans[b][0], abs=0.02)
    # the trajectory chart's points of the same metric sit at the same x
    points = [e for e in trajectory if e["tag"] == "circle" and e["title"]]
    assert sorted(float(e["attrs"]["cx"]) for e in points) == pytest.approx([at(s) for s in STEPS], abs=0.06)


def test_direction_heat_map_and_curves(report):
    written, _, _, page = report
    found = cells(page.svg("representations", "shift per layer"))
    assert {k: c["value"] for k, c in found.items()} == {
        (i, s): written[s]["persona"]["layers"]["shift"][LAYERS.index(i)] for i in LAYERS for s in STEPS
    }
    chart = page.svg("representations", "projection at layer 1")
    tips = [e["title"] for e in chart if e["tag"] == "circle"]
    assert len(tips) == len(STEPS) and all("(layer 1)" in t for t in tips)


def test_adapter_heat_map_is_each_layers_update_norm(report):
    written, _, _, page = report
    found = cells(page.svg("representations", "update norm per layer"))
    for step in STEPS:
        modules = written[step]["lora"]["modules"]
        for layer in (0, 2):
            norms = [n for n, at in zip(modules["norm"], modules["layer"]) if at == layer]
            expected = math.sqrt(sum(n * n for n in norms)) if step else 0.0  # the base model: no update
            assert found[(layer, step)]["value"] == pytest.approx(expected, rel=1e-12)
    assert not any(layer == 1 for layer, _ in found)  # no adapted module in layer 1: no row
    other = [e["title"] for e in page.svg("representations", "update norm per layer") if e["title"].startswith("modules outside")]
    assert len(other) == len(STEPS)  # the head's own row
    rotation = page.svg("representations", "rotation")
    points = [e for e in rotation if e["tag"] == "circle" and e["title"].startswith("mean over modules")]
    assert len(points) == len(STEPS) - 2  # none at the base, none at the first checkpoint (no previous one)


def test_sae_table_is_the_last_steps_top_features(report):
    written, _, _, page = report
    features = written[STEPS[-1]]["feats"]["features"]
    rows = [r for r in page.cells["representations"] if r]
    assert [int(r[0]) for r in rows] == features["feature"]
    assert [float(r[3]) for r in rows] == pytest.approx(features["change"], rel=1e-3)  # shown to 4 significant digits


def test_header_link_and_self_contained(report):
    _, _, html, page = report
    assert "#representations" in page.links
    assert "<script" not in html and "http://" not in html and "https://" not in html


def test_no_section_without_such_suites(tmp_path):
    make_run(tmp_path / "run", with_suites=False)
    html = write_report([tmp_path / "run"]).read_text()
    assert 'id="trajectory"' in html and 'id="representations"' not in html and "#representations" not in html


def test_kind_from_the_step_files_when_the_config_lacks_the_suite(tmp_path):
    """Suites given to `finetrack eval` apart from the config: their kind is read from the step files' extra key."""
    written = make_run(tmp_path / "run", configured=False, seed=1)
    page = Page(write_report([tmp_path / "run"]).read_text())
    headings = [lab for s, lab in page.svgs if s == "representations"]
    assert any(h.startswith("shift:") for h in headings) and any(h.startswith("update norm per layer") for h in headings)
    assert cells(page.svg("representations", "shift:"))[(1, 4)]["value"] == written[4]["probe"]["layers"]["shift"][1]


def test_several_runs_one_set_each(tmp_path):
    a, b = make_run(tmp_path / "a", seed=2), make_run(tmp_path / "b", seed=3)
    html = write_report([tmp_path / "a", tmp_path / "b"], tmp_path / "both.html").read_text()
    section = html[html.index('id="representations"') :]
    assert section.count("representation suite 'probe'") == 2
    maps = re.findall(r'<svg[^>]*aria-label="shift: .*?</svg>', section, re.DOTALL)
    assert len(maps) == 2
    for page_part, written in zip(maps, (a, b)):
        assert cells(Page(page_part).svg("", "shift:"))[(2, 12)]["value"] == written[12]["probe"]["layers"]["shift"][2]


# ---------------------------------------------------------------------------------- real browser
@pytest.mark.skipif(browser.chromium() is None and not os.environ.get("CI"), reason="chromium not installed")
def test_section_renders_in_headless_chromium(report):
    _, path, _, _ = report
    page = browser.render(path)
    assert page.requests == [path.resolve().as_uri()]  # nothing fetched
    assert page.layout["scroll_width"] <= page.layout["inner_width"]
    # loss chart + 3 training curves with data + trajectory charts + the section's 5 + 3 + 3 + 1 figures
    assert page.layout["num_charts"] >= 12 + 5 and page.layout["min_chart_width"] >= 500
