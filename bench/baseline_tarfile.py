"""Baseline (d): the original system's approach, one `tarfile` 'w:gz' per study.

Kept as a separate script so the harness can time it as a whole process, the
same way it times the pipeline. `tarfile` uses zlib at compresslevel 9 (its
default) on a single gzip stream, which is what the original system did.

Usage: baseline_tarfile.py JOBS.json, where JOBS.json is
{"input": DIR, "studies": [{"out": PATH, "files": [REL, ...]}, ...]}.
"""
from __future__ import annotations

import json
import sys
import tarfile
from pathlib import Path


def main() -> None:
    jobs = json.loads(Path(sys.argv[1]).read_text())
    root = Path(jobs["input"])
    for study in jobs["studies"]:
        out = Path(study["out"])
        out.parent.mkdir(parents=True, exist_ok=True)
        with tarfile.open(out, "w:gz") as tar:
            for rel in study["files"]:
                tar.add(root / rel, arcname=rel)


if __name__ == "__main__":
    main()
