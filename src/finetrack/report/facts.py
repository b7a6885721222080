"""The "Run facts" section of the report: where the run is, what it trained, its data and its checkpoints."""

from __future__ import annotations

import json
from html import escape

import yaml

from ..rundir import size_text
from .collect import RunData
from .html import collapsed, is_num, section, swatch, table
from .validation import facts as validation_facts


def run_facts(r: RunData, color: str, index: int) -> str:
    from ..redact import redact  # the config may hold a remote URL with credentials

    meta = r.newest_meta()
    remote = r.config.get("checkpoint", {}).get("remote")
    facts = [
        ("run directory", escape(str(r.path.resolve()))),
        (
            "model",
            escape(
                f"{r.config.get('model', {}).get('name')} · {r.config.get('model', {}).get('method')} · "
                f"{r.config.get('model', {}).get('dtype')}"
            ),
        ),
        (
            "global batch",
            escape(f"{r.resolved('global_batch_size', '?')} rows per step · {r.resolved('steps_per_epoch', '?')} steps per epoch"),
        ),
        *([("warm start", escape(redact(_warm_start_fact(r.resolved("init_from")))))] if r.resolved("init_from") else []),
        ("duration", escape(duration(r))),
        ("tokens seen", escape(f"{meta.get('tokens_seen', max([m.get('tokens', 0) for m in r.metrics] + [0])):,}")),
        ("versions", escape(", ".join(f"{k} {v}" for k, v in r.versions.items()) or "-")),
        ("git commit", escape(meta.get("git_sha") or "-")),
        ("config hash", escape(meta.get("config_hash") or "-")),
        ("remote copies", escape(_remote_fact(r, remote))),
        ("trackers", escape(json.dumps(r.trackers)) if r.trackers else "none"),
        *validation_facts(r),  # the best checkpoint (checkpoints/best.json) and why the run stopped
    ]
    best_step = r.best["step"] if r.best is not None else None
    ck_rows = [
        [
            c.folder + (' <b class="best">(best)</b>' if c.step == best_step else ""),
            f"{c.meta.get('epoch', 0):.2f}" if c.meta else "-",
            escape("+".join(c.meta.get("rules", [])) or "-"),
            size_text(c.size_bytes),
            "yes" if c.resumable else "no",
            escape(c.meta.get("saved_at", "-")),
            "complete" if c.complete else f'<span class="bad">{escape(c.problem)}</span>',
        ]
        for c in r.checkpoints
    ]
    columns = ["folder", "epoch", "rules", "size", "resume state", "saved at", "status"]
    if remote or r.remote:  # where each checkpoint's remote copy stands, from the uploader's remote.json
        columns.append("remote")
        for row, c in zip(ck_rows, r.checkpoints):
            row.append(
                "no upload record"
                if r.remote is None
                else "uploaded"
                if c.step in r.remote["uploaded_steps"]
                else '<span class="bad">failed</span>'
                if c.step in r.remote["failed_steps"]
                else "not yet"
            )
    body = (
        table(["", ""], [[k, v] for k, v in facts], raw=True, header=False)
        + "<h3>Data</h3>"
        + _data_table(r.data_report)
        + f"<h3>Checkpoints ({len(r.checkpoints)}, {size_text(sum(c.size_bytes for c in r.checkpoints))})</h3>"
        + (table(columns, ck_rows, raw=True) if ck_rows else '<p class="empty">none</p>')
        + collapsed(
            "Resolved config (config.resolved.yaml)", f"<pre>{escape(redact(yaml.safe_dump(r.config, sort_keys=False, width=120)))}</pre>"
        )
        + (
            collapsed("Data report (data_report.json)", f"<pre>{escape(json.dumps(r.data_report, indent=2))}</pre>")
            if r.data_report
            else ""
        )
    )
    return section(f"facts-{index}", swatch(color) + "Run facts: " + escape(r.name), body, raw_title=True)


def _warm_start_fact(record: dict) -> str:
    """model.init_from as config.resolved.yaml records it: where the weights of step 0 came from."""
    step = f"step {record['step']} · " if record.get("step") is not None else ""
    manifest = f" · manifest sha256 {record['manifest_sha256'][:12]}" if record.get("manifest_sha256") else ""
    return f"from {record.get('from')} ({step}{record.get('folder')}{manifest}); a new run from step 0"


def _remote_fact(r: RunData, remote: str | None) -> str:
    """Where the remote copies are: the uploader's record (remote.json) when there is one, else the config's URL."""
    from ..redact import redact

    if r.remote is not None:
        url = redact(r.remote["url"]).rstrip("/")
        up, failed = r.remote["uploaded_steps"], r.remote["failed_steps"]
        return (
            f"{url}/checkpoints/ · {len(up)} uploaded, {len(failed)} failed (remote.json; per checkpoint below) · "
            f"`finetrack sync {url} DIR` fetches them"
        )
    if remote:
        return (
            f"{redact(remote).rstrip('/')}/checkpoints/ · no upload record (no remote.json in the run directory: "
            f"nothing uploaded yet, or an older finetrack) · `finetrack sync {redact(remote)} DIR` fetches what is there"
        )
    return "none (checkpoint.remote not set)"


def _data_table(report: dict | None) -> str:
    if not report:
        return '<p class="empty">no data_report.json</p>'
    t = report.get("train", {})
    tok = t.get("tokens", {})
    dropped = ", ".join(f"{k} {v}" for k, v in t.get("dropped", {}).items()) or "none"
    rows = [
        ["rows read / kept", f"{t.get('rows_read', '?')} / {t.get('rows_kept', '?')}"],
        ["dropped", dropped],
        ["truncated rows", str(t.get("truncated_rows", "?"))],
        ["held out for eval", str(t.get("held_out_for_eval", report.get("eval", {}).get("rows_kept", 0)))],
        ["tokens per row (min / mean / p95 / max)", " / ".join(str(tok.get(k, "?")) for k in ("min", "mean", "p95", "max"))],
        [
            "tokens / trainable tokens",
            f"{tok.get('total', '?'):,} / {t.get('trainable_tokens', '?'):,}"
            if isinstance(tok.get("total"), int) and isinstance(t.get("trainable_tokens"), int)
            else "?",
        ],
    ]
    return table(["", ""], [[escape(a), escape(b)] for a, b in rows], raw=True, header=False)


def duration(r: RunData) -> str:
    """Wall clock from the first to the last logged step, and the time spent in optimizer steps."""
    windows = []  # optimizer-step seconds of each logged window: its tokens over its throughput
    prev = 0
    for m in r.metrics:
        if is_num(m.get("tokens")) and is_num(m.get("tokens_per_s")) and m["tokens_per_s"] > 0:
            windows.append((m["tokens"] - prev) / m["tokens_per_s"])
            prev = m["tokens"]
    training = sum(windows)
    times = [m["time"] for m in r.metrics if is_num(m.get("time"))]
    if not times and not training:
        return "-"
    # wall clock: first to last logged step, plus the first window (which ran before its line was written)
    wall = f"{_hms(max(times) - min(times) + (windows[0] if windows else 0))} wall clock" if times else ""
    return "; ".join(x for x in (wall, f"{_hms(training)} in optimizer steps" if training else "") if x)


def _hms(seconds: float) -> str:
    s = round(seconds)
    return f"{s // 3600}h{s % 3600 // 60:02d}m" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
