"""``adm-export inspect``: a readable description of an artifact folder or a build folder."""

from __future__ import annotations

import json
from pathlib import Path

from adm_export.artifacts import MANIFEST, read_json
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
    m = read_json(path, "FOLDER", MANIFEST)
    model = m.get("model") if isinstance(m.get("model"), dict) else {}
    files = m.get("files") if isinstance(m.get("files"), dict) else {}
    lines = [
        f"stage: {m.get('stage')} (format {m.get('format_version')}, created {m.get('created')})",
        f"model: {model.get('id')} [{model.get('family')}] fingerprint {str(model.get('fingerprint'))[:12]}",
        f"config: {json.dumps(m.get('config'))}",
        "files: " + ", ".join(f"{k} ({v.get('bytes', 0) / 1e6:.2f} MB)" for k, v in files.items() if isinstance(v, dict)),
    ]
    for key in ("selection", "quantizers", "quant_error_rel_l2", "sizes", "parity", "report"):
        if key in m:
            value = m[key]
            if key == "parity" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if not isinstance(v, list)}
            if key == "quant_error_rel_l2" and isinstance(value, dict):
                value = {k: v for k, v in value.items() if k != "per_point"}
            lines.append(f"{key}: {json.dumps(value, default=str)[:1500]}")
    return "\n".join(lines)
