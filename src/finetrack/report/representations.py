"""The "Representations" section: the suites that compare each checkpoint with the base model (step 0), read from
eval/step-NNNNNN.json (`record["suites"][name]`), one set of figures per suite and run.

representation   heat maps layer x step of shift, shift_last, cosine and CKA; kl against step
direction        projection and shift at the reported layer against step; heat map layer x step of the shift
adapter          norm and rotation against step; heat map layer x step of the update norm (a layer's modules together)
sae              max_change against step; the top features at the last evaluated step

A suite's kind is the one config.resolved.yaml gives it, else read from its step files' extra key ("layers",
"modules", "features"). Heat-map columns sit on the trajectory charts' step axis (heatmap.py), and the line charts
here are drawn on that same axis, so all of them read against the loss and the judged rates above.
"""

from __future__ import annotations

import math
from html import escape

from .charts import Chart, Series, render
from .collect import RunData
from .heatmap import HeatMap, Scale, render_heatmap
from .html import is_num, num, section, swatch, table

KINDS = ("representation", "direction", "adapter", "sae")
_DARK = "darker: further from the base model"
# representation heat maps: per-layer key, title, colour scale (cosine and CKA: lower = further from the base)
_REPRESENTATION_MAPS: tuple[tuple[str, str, Scale], ...] = (
    ("shift", "shift: relative L2 change (mean over tokens)", "sequential"),
    ("shift_last", "shift_last: relative L2 change (last prompt token)", "sequential"),
    ("cosine", "cosine: mean cosine with the base (over tokens)", "reversed"),
    ("cka", "cka: linear CKA with the base (over the probes)", "reversed"),
)


def suite_kinds(r: RunData) -> dict[str, str]:
    """Suite name -> kind, for the run's suites that compare with the base model, in the order the step files name
    them: config.resolved.yaml's kind, else the one the extra key of its results implies."""
    configured = _configured_kinds(r)
    out: dict[str, str] = {}
    for record in r.evals:
        suites = record.get("suites")
        for name, block in suites.items() if isinstance(suites, dict) else ():
            kind = configured.get(name) or _kind_of(block)
            if kind and name not in out:
                out[name] = kind
    return out


def has_representations(runs: list[RunData]) -> bool:
    return any(suite_kinds(r) for r in runs)


def representations_section(runs: list[RunData], colors: dict[str, str]) -> str:
    """One set of figures per run and suite of kind representation / direction / adapter / sae; '' when none."""
    steps = [e["step"] for r in runs for e in r.evals]
    if not steps or not has_representations(runs):
        return ""
    axis = (float(min(steps)), float(max(steps)))  # as the trajectory charts: the evaluated steps of every run
    parts = []
    for r in runs:
        for name, kind in suite_kinds(r).items():
            who = f"{swatch(colors[r.name])}{escape(r.name)} · " if len(runs) > 1 else ""
            heading = f"<h3>{who}{escape(kind)} suite '{escape(name)}'</h3>"
            parts.append(heading + _PARTS[kind](r, name, _results(r, name), axis, colors[r.name]))
    note = (
        '<p class="sub">The suites that compare each checkpoint with the base model (step 0), from eval/step-NNNNNN.json. '
        "Heat maps: one row per decoder layer (layer i = output of block i), one column per evaluated step (▼), on the "
        "step axis of the trajectory charts; hover a cell for its layer, step and exact value (grey: no value).</p>"
    )
    return section("representations", "Representations", note + "".join(parts))


# ------------------------------------------------------------------------------------------ kinds
def _representation(r: RunData, name: str, results: list[tuple[int, dict]], axis: tuple[float, float], color: str) -> str:
    figures = [_layer_map(results, "layers", key, title, scale, _DARK, axis) for key, title, scale in _REPRESENTATION_MAPS]
    figures.append(_line_chart(results, [("kl", "kl", False)], "kl: next-token KL(checkpoint || base)", "KL (nats per token)", axis, color))
    counts = _last(results, "counts")
    probes = (
        f" ({counts['prompts']} probe prompts, {counts['tokens']} tokens)"
        if is_num(counts.get("prompts")) and is_num(counts.get("tokens"))
        else ""
    )
    text = (
        f"Each layer's hidden states on the probe prompts{probes}, checkpoint against base model. shift: relative L2 "
        "change ||h - h_base|| / ||h_base|| of the layer's hidden states against the base model, mean over the probe "
        "prompts' tokens; shift_last: the same at each prompt's last token; cosine: mean cosine of h and h_base over the "
        "tokens; cka: linear CKA of the two over the probes (each probe the mean of its tokens; 1 = the same geometry up "
        "to rotation and scale). kl: mean next-token KL(checkpoint || base) over the probe tokens, in nats."
    )
    return _sentence(text) + _bad(results, "layers") + _grid(figures)


def _direction(r: RunData, name: str, results: list[tuple[int, dict]], axis: tuple[float, float], color: str) -> str:
    metrics = _last(results, "metrics")
    layers = {b.get("metrics", {}).get("layer") for _, b in results if is_num(b.get("metrics", {}).get("layer"))}
    at = f" at layer {int(metrics['layer'])}" if len(layers) == 1 and is_num(metrics.get("layer")) else " at the reported layer"
    figures = [
        _line_chart(results, [("projection", "projection", False)], f"projection{at}", "projection (activation units)", axis, color),
        _line_chart(results, [("shift", "shift", False)], f"shift{at}", "shift of the mean (activation units)", axis, color),
        _layer_map(results, "layers", "shift", "shift per layer", "diverging", "red: towards positive, blue: negative", axis),
    ]
    separation = (
        f" The two sets' separation on the base model{at}: {num(metrics.get('separation'))}." if is_num(metrics.get("separation")) else ""
    )
    text = (
        "A direction per layer: the mean activation of the positive texts minus that of the negative texts, on the base "
        f"model. projection: the probe prompts' mean projection on the direction{at}; shift: the projection of "
        "mean(checkpoint) - mean(base) probe activations on it (0 at the base); the heat map shows that shift at every "
        "layer. Separation: (mean positive - mean negative projection) / pooled std." + separation
    )
    if len(layers) > 1:
        text += " The reported layer changes between steps; hover a point for its layer."
    return _sentence(text) + _bad(results, "layers") + _grid(figures)


def _adapter(r: RunData, name: str, results: list[tuple[int, dict]], axis: tuple[float, float], color: str) -> str:
    figures = [
        _line_chart(
            results,
            [("norm", "norm", False), ("max_norm", "largest module", True)],
            "norm: the whole update",
            "Frobenius norm",
            axis,
            color,
        ),
        _line_chart(
            results,
            [("rotation_deg", "mean over modules", False), ("max_rotation_deg", "largest", True)],
            "rotation since the previous checkpoint",
            "degrees",
            axis,
            color,
        ),
        _layer_norm_map(results, axis),
    ]
    text = (
        "The LoRA update scale x B @ A of each adapted module, read from the checkpoint's adapter files (no forward pass). "
        "norm: Frobenius norm of the whole update, sqrt of the sum over modules of ||scale x B @ A||_F^2 (0 at the base); "
        "rotation: the angle between each module's top singular component u1 v1^T now and at the previous checkpoint "
        "(none at the first); the heat map: per decoder layer, sqrt of the sum of its modules' squared norms."
    )
    return _sentence(text) + _bad(results, "modules") + _grid(figures)


def _sae(r: RunData, name: str, results: list[tuple[int, dict]], axis: tuple[float, float], color: str) -> str:
    chart = _line_chart(
        results,
        [("max_change", "largest |change|", False), ("mean_abs_change", "mean |change|", True)],
        "max_change: SAE feature activations",
        "change of a feature's mean activation",
        axis,
        color,
    )
    layer = next((s.get("layer") for s in _configured(r) if s.get("name") == name), None)
    where = f" on layer {layer} (blocks.{layer}.hook_resid_post)" if isinstance(layer, int) else ""
    text = (
        f"A sparse autoencoder{where} of the base model: max_change is the largest |change| of a feature's mean "
        "activation over the probe tokens, checkpoint minus base; mean |change| over all its features dashed."
    )
    last = next(((s, b["features"]) for s, b in reversed(results) if _features_ok(b.get("features"))), None)
    if last is None:
        top = '<p class="empty">No features listed in the step files yet.</p>'
    else:
        step, features = last
        rows = [
            [escape(str(f)), num(b), num(c), num(d)]
            for f, b, c, d in zip(features["feature"], features["base"], features["checkpoint"], features["change"])
        ]
        top = f'<p class="sub">Top features at step {step}, the last evaluated step (largest |change| first; mean activation over the probe tokens).</p>'
        top += table(["feature", "base", "checkpoint", "change"], rows, raw=True)
    return _sentence(text) + _grid([chart]) + top


_PARTS = {"representation": _representation, "direction": _direction, "adapter": _adapter, "sae": _sae}


# ---------------------------------------------------------------------------------------- figures
def _layer_map(
    results: list[tuple[int, dict]], group: str, key: str, title: str, scale: Scale, legend: str, axis: tuple[float, float]
) -> HeatMap:
    """Heat map of the per-layer list `key` of each step's `group` ("layers"): one row per layer any step reports."""
    values: dict[tuple[str, int], float | None] = {}
    layers: set[int] = set()
    for step, block in results:
        for layer, value in (_per_layer(block.get(group), key) or {}).items():
            layers.add(layer)
            values[(str(layer), step)] = value
    rows = [(str(i), f"layer {i}") for i in sorted(layers)]
    return HeatMap(title, _step_axis(), "decoder layer", key, rows, values, [s for s, _ in results], axis, scale, legend)


def _layer_norm_map(results: list[tuple[int, dict]], axis: tuple[float, float]) -> HeatMap:
    """Per decoder layer and step, sqrt of the sum of its modules' squared update norms (modules with no layer number,
    such as the head, in one row of their own)."""
    values: dict[tuple[str, int], float | None] = {}
    notes: dict[tuple[str, int], str] = {}
    layers: set[int | None] = set()
    base_steps = []
    for step, block in results:
        modules = block.get("modules")
        if not _modules_ok(modules):
            continue
        if not modules["module"] and block.get("metrics", {}).get("norm") == 0:
            base_steps.append(step)  # the base model: no update anywhere
            continue
        squares: dict[int | None, list[float]] = {}
        for layer, norm in zip(modules["layer"], modules["norm"]):
            squares.setdefault(layer, []).append(norm * norm if is_num(norm) else math.nan)
        for layer, sq in squares.items():
            layers.add(layer)
            label = _row_label(layer)
            values[(label, step)] = math.sqrt(sum(sq)) if all(math.isfinite(x) for x in sq) else None
            notes[(label, step)] = f"{len(sq)} module{'s' if len(sq) > 1 else ''}"
    rows = [(_row_label(i), f"layer {i}") for i in sorted(x for x in layers if x is not None)]
    if None in layers:
        rows.append(("other", "modules outside the decoder layers"))
    for step in base_steps:
        for label, _ in rows:
            values[(label, step)] = 0.0
            notes[(label, step)] = "base model: no update"
    steps = [s for s, _ in results]
    return HeatMap("update norm per layer", _step_axis(), "decoder layer", "norm", rows, values, steps, axis, "sequential", _DARK, notes)


def _line_chart(
    results: list[tuple[int, dict]], metrics: list[tuple[str, str, bool]], title: str, unit: str, axis: tuple[float, float], color: str
) -> Chart:
    """One series per (metric, label, dashed) of the suite's metrics, on the shared step axis."""
    series = []
    for metric, label, dashed in metrics:
        rows = [(s, b["metrics"]) for s, b in results if is_num(b.get("metrics", {}).get(metric))]
        notes = [f"layer {m['layer']}" if is_num(m.get("layer")) else "" for _, m in rows]
        series.append(Series(label, color, [(s, float(m[metric])) for s, m in rows], dashed=dashed, marker="dot", notes=notes))
    return Chart(title, _step_axis(), unit, series, x_range=axis)


def _grid(figures: list[Chart | HeatMap]) -> str:
    """The report's chart grid (html.grid) for line charts and heat maps alike."""
    svgs = (render_heatmap(f) if isinstance(f, HeatMap) else render(f) for f in figures)
    return '<div class="grid">' + "".join(f"<figure>{s}</figure>" for s in svgs) + "</div>"


# ----------------------------------------------------------------------------------------- reading
def _results(r: RunData, name: str) -> list[tuple[int, dict]]:
    """(step, the suite's block) for every step file holding the suite, by step."""
    out = []
    for record in r.evals:
        block = (record.get("suites") or {}).get(name) if isinstance(record.get("suites"), dict) else None
        if isinstance(block, dict):
            out.append((record["step"], block if isinstance(block.get("metrics"), dict) else {**block, "metrics": {}}))
    return out


def _per_layer(table_: object, key: str) -> dict[int, float | None] | None:
    """Layer -> value of one per-layer list ("layers": {"layer": [...], key: [...]}); None when the lists are garbled."""
    if not isinstance(table_, dict):
        return None
    layers, values = table_.get("layer"), table_.get(key)
    if not (isinstance(layers, list) and isinstance(values, list) and len(layers) == len(values)):
        return None
    if not all(isinstance(i, int) and not isinstance(i, bool) for i in layers):
        return None
    return {i: float(v) if is_num(v) else None for i, v in zip(layers, values)}


def _parallel(lists: object, *keys: str) -> bool:
    """An extra key of a step file read as intended: a dict of equally long lists, `keys` among them."""
    if not isinstance(lists, dict) or not all(isinstance(lists.get(k), list) for k in keys):
        return False
    return all(isinstance(v, list) for v in lists.values()) and len({len(v) for v in lists.values()}) <= 1


def _modules_ok(modules: object) -> bool:
    return _parallel(modules, "module", "layer", "norm")


def _features_ok(features: object) -> bool:
    return _parallel(features, "feature", "base", "checkpoint", "change") and bool(features["feature"])


def _bad(results: list[tuple[int, dict]], group: str) -> str:
    """The steps whose per-layer (per-module) lists could not be read: said, not hidden (their cells are grey)."""
    key = "module" if group == "modules" else "layer"
    bad = [s for s, b in results if group in b and not _parallel(b[group], key)]
    if not bad:
        return ""
    steps = ", ".join(map(str, bad))
    return f'<p class="bad">Step(s) {steps}: the "{group}" of the step file are not parallel lists; shown as no value.</p>'


def _last(results: list[tuple[int, dict]], part: str) -> dict:
    """The suite's metrics or counts at its last evaluated step ({} when none)."""
    value = results[-1][1].get(part) if results else None
    return value if isinstance(value, dict) else {}


def _configured(r: RunData) -> list[dict]:
    section_ = r.config.get("eval")
    suites = section_.get("suites") if isinstance(section_, dict) else None
    return [s for s in suites if isinstance(s, dict)] if isinstance(suites, list) else []


def _configured_kinds(r: RunData) -> dict[str, str]:
    return {s["name"]: s["kind"] for s in _configured(r) if isinstance(s.get("name"), str) and s.get("kind") in KINDS}


def _kind_of(block: object) -> str | None:
    """A suite's kind from its results' extra key, for step files whose config does not list the suite."""
    if not isinstance(block, dict):
        return None
    if "modules" in block:
        return "adapter"
    if "features" in block:
        return "sae"
    layers = block.get("layers")
    if isinstance(layers, dict):
        return "direction" if "projection" in layers else "representation" if "shift" in layers else None
    return None


def _row_label(layer: int | None) -> str:
    return "other" if layer is None else str(layer)


def _sentence(text: str) -> str:
    return f'<p class="sub">{escape(text)}</p>'


def _step_axis() -> str:
    from .page import STEP_AXIS  # page imports this module

    return STEP_AXIS + " (0 = base model)"
