"""How the benchmarks print their figures and record them in bench/results/<scenario>.json."""

from __future__ import annotations

import json
import os
import platform
import subprocess
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

RESULTS_DIR = Path(__file__).resolve().parent / "results"


def verdict(ok: bool) -> str:
    return "MET" if ok else "MISSED"


def headline(text: str) -> None:
    print(f"\n== {text}", flush=True)


def figure(label: str, value: str, target: str = "", ok: bool | None = None) -> None:
    suffix = f"   target {target}: {verdict(ok)}" if ok is not None else ""
    print(f"   {label:<46} {value}{suffix}", flush=True)


def write_result(name: str, data: dict[str, Any]) -> Path:
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{name}.json"
    payload = {"scenario": name, "measured_at": datetime.now(UTC).isoformat(), "machine": machine(), **data}
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    print(f"   -> {path.relative_to(Path.cwd()) if path.is_relative_to(Path.cwd()) else path}")
    return path


def machine() -> dict[str, Any]:
    dovecot = subprocess.run(["dovecot", "--version"], capture_output=True, text=True, check=False)
    return {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "dovecot": dovecot.stdout.strip(),
        "platform": platform.platform(),
    }


def percentile(values: list[float], fraction: float) -> float:
    """Nearest-rank percentile (p95 of 50 values is the 48th smallest)."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), int(-(-fraction * len(ordered) // 1))))
    return ordered[rank - 1]
