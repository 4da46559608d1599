"""``adm-export inspect``: a readable description of an artifact folder or a build folder."""

from __future__ import annotations

import json
from pathlib import Path

from adm_export.artifacts import MANIFEST
from adm_export.errors import ArtifactNotFoundError


def describe(folder: str | Path) -> str:
    """Describe a build folder (its report.md) or one stage's artifact (its manifest)."""
    folder = Path(folder)
    if (folder / "report.md").is_file():
        return (folder / "report.md").read_text()
    path = folder / MANIFEST
    if not path.is_file():
        raise ArtifactNotFoundError(
            f"{str(folder)!r} is neither a build folder (report.md) nor an artifact (manifest.json)"
        )
    m = json.loads(path.read_text())
    lines = [
        f"stage: {m.get('stage')} (format {m.get('format_version')}, created {m.get('created')})",
        f"model: {m['model'].get('id')} [{m['model'].get('family')}] fingerprint {str(m['model'].get('fingerprint'))[:12]}",
        f"config: {json.dumps(m.get('config'))}",
        "files: " + ", ".join(f"{k} ({v['bytes'] / 1e6:.2f} MB)" for k, v in m.get("files", {}).items()),
    ]
    for key in ("selection", "quantizers", "quant_error_rel_l2", "sizes", "parity", "report"):
        if key in m:
            value = m[key]
            if key == "parity":
                value = {k: v for k, v in value.items() if not isinstance(v, list)}
            if key == "quant_error_rel_l2":
                value = {k: v for k, v in value.items() if k != "per_point"}
            lines.append(f"{key}: {json.dumps(value, default=str)[:1500]}")
    return "\n".join(lines)
