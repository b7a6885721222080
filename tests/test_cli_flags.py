"""The command-line surface is snapshot-tested: adding, renaming or changing a flag (its type, default, choices)
is a deliberate change that shows up in review as a diff of tests/snapshots/cli_flags.txt.

To regenerate the snapshot after such a change:

    .venv/bin/python tests/test_cli_flags.py
"""

from __future__ import annotations

import sys
from pathlib import Path

from finetrack import flags

SNAPSHOT = Path(__file__).parent / "snapshots" / "cli_flags.txt"


def test_every_verbs_flags_match_the_snapshot():
    assert flags.snapshot() == SNAPSHOT.read_text(), (
        "the CLI flags changed: if that is intended, regenerate with `.venv/bin/python tests/test_cli_flags.py` and commit the diff"
    )


def test_the_snapshot_covers_every_verb_and_would_see_a_new_flag():
    text = flags.snapshot()
    for verb in ("train", "sync", "eval", "gate", "report", "plan", "demo"):
        assert f"\n{verb} --verbose " in text, verb
    parser = flags.parser()
    sub = next(a for a in parser._actions if a.dest == "verb")
    sub.choices["plan"].add_argument("--brand-new", type=int)
    assert flags.snapshot(parser) != text and "plan --brand-new type=int" in flags.snapshot(parser)


if __name__ == "__main__":
    SNAPSHOT.parent.mkdir(exist_ok=True)
    SNAPSHOT.write_text(flags.snapshot())
    print(f"wrote {SNAPSHOT}", file=sys.stderr)
