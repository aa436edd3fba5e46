"""A real Prometheus (Debian's ``prometheus`` package) on loopback, for the monitoring tests.

It scrapes one target every second as job ``emailops``, with the given rule files loaded, keeps
its data in a folder of the test, and answers queries over its HTTP API. ``scraped`` reads one
sample straight from a daemon's /metrics, for tests that need no Prometheus.
"""

from __future__ import annotations

import http.client
import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

from prometheus_client.parser import text_string_to_metric_families

from localmail.dovecot import free_loopback_port

PROMETHEUS = shutil.which("prometheus") or "/usr/bin/prometheus"
PROMTOOL = shutil.which("promtool") or "/usr/bin/promtool"
READY_SECONDS = 60.0


def scraped(env: dict[str, str], name: str, **labels: str) -> float | None:
    """The value of one sample on the daemon's /metrics (METRICS_PORT), None when it is absent."""
    with urllib.request.urlopen(f"http://127.0.0.1:{env['METRICS_PORT']}/metrics", timeout=10) as answer:
        text = answer.read().decode()
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == labels:
                return float(sample.value)
    return None


class LocalPrometheus:
    def __init__(self, work_dir: Path, target: str, rule_files: list[Path]) -> None:
        self.work_dir = work_dir
        self.port = free_loopback_port()
        self.log_path = work_dir / "prometheus.log"
        rules = "".join(f"  - {json.dumps(str(path))}\n" for path in rule_files)
        self.config = work_dir / "prometheus.yml"
        self.config.write_text(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\n"
            f"rule_files:\n{rules}"
            "scrape_configs:\n"
            f"  - job_name: emailops\n    static_configs:\n      - targets: [{json.dumps(target)}]\n"
        )
        self.process: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> LocalPrometheus:
        with self.log_path.open("wb") as log:
            self.process = subprocess.Popen(
                [
                    PROMETHEUS,
                    f"--config.file={self.config}",
                    f"--storage.tsdb.path={self.work_dir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        deadline = time.monotonic() + READY_SECONDS
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"Prometheus did not start:\n{self.log_path.read_text()[-3000:]}")
            time.sleep(0.2)
        return self

    def __exit__(self, *exc_info: object) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=10)

    def _get(self, path: str, timeout: float) -> tuple[int, bytes]:
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            connection.request("GET", path)
            answer = connection.getresponse()
            return answer.status, answer.read()
        finally:
            connection.close()

    def _ready(self) -> bool:
        try:
            return self._get("/-/ready", timeout=2)[0] == 200
        except OSError:
            return False

    def api(self, path: str, **params: str) -> Any:
        query = f"?{urllib.parse.urlencode(params)}" if params else ""
        status, raw = self._get(f"/api/v1/{path}{query}", timeout=10)
        body = json.loads(raw)
        assert status == 200 and body["status"] == "success", body
        return body["data"]

    def query(self, expression: str) -> list[dict[str, Any]]:
        """An instant query's samples: [{"metric": {...}, "value": [time, "text"]}, ...]."""
        data = self.api("query", query=expression)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def value(self, expression: str) -> float | None:
        """The value of a query that yields at most one sample (None when it yields none)."""
        samples = self.query(expression)
        assert len(samples) <= 1, samples
        return float(samples[0]["value"][1]) if samples else None
