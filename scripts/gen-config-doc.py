#!/usr/bin/env python3
"""Write docs/configuration.md from filterd.config.SETTINGS (the one place settings live).

tests/unit/test_qa.py fails when the committed file differs from what this prints, so the
reference cannot drift from the code. Run: .venv/bin/python scripts/gen-config-doc.py
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from filterd.config import SECTIONS, SETTINGS  # noqa: E402

HEAD = """# Configuration reference

Generated from `filterd/config/__init__.py` by `scripts/gen-config-doc.py`; do not edit by hand.

filterd reads one TOML file: `--config FILE`, else `$FILTERD_CONFIG`, else
`/etc/filterd/filterd.toml` (built-in defaults when that default file is absent). Every key
below is typed and defaulted; an unknown section or key is an error naming the file and key
(`filterd config check`). `filterd config show [--non-default]` prints the values in force.
`--state-dir DIR` and `$FILTERD_STATE_DIR` override `daemon.state_dir`.

Policy — scores, levels, forced actions, failure defaults, which checks run with which
arguments — is not here: it is data in `rules/` (see `rules/README.md`), layered by a site's
`local.d/` and `override.d/` directories next to the config file (`rules.site_dir`).
"""


def render() -> str:
    out = [HEAD]
    for section in SECTIONS:
        out.append(f"\n## [{section}]\n")
        out.append("| key | type | default | meaning |")
        out.append("|---|---|---|---|")
        for s in SETTINGS:
            if s.section != section:
                continue
            kind = s.kind + (f" ({', '.join(s.choices)})" if s.choices else "")
            default = json.dumps(s.default).replace("|", "\\|")
            doc = s.doc.replace("|", "\\|")
            out.append(f"| `{s.name}` | {kind} | `{default}` | {doc} |")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    target = ROOT / "docs" / "configuration.md"
    if "--check" in sys.argv:
        sys.exit(0 if target.read_text() == render() else 1)
    target.write_text(render())
    print(f"wrote {target}")
