"""A fake training interpreter and a fake llama-server for LocalLoRAProvider's state machine.

The provider runs ``<python> _train_lora.py <spec>`` and ``<python> convert_lora_to_gguf.py ...``;
``fake_python`` stands in for that interpreter (an executable script), doing what ``FAKE_MODE`` says:

    ok            write what the real scripts write (PEFT files, a GGUF adapter)
    train-crash   training exits 3 with a traceback-like message
    train-hang    training writes its pid to <spec dir>/pid and sleeps (cancel() must kill it)
    convert-fail  the converter exits 1
    convert-junk  the converter exits 0 but writes no GGUF
    refuse        the adapter's GGUF holds BAD: the fake server refuses it, as llama-server does a broken one

``fake_start`` stands in for ``llama_server.start``: a real HTTP server on 127.0.0.1 answering
``/health`` and ``/lora-adapters`` with the adapters it was given, which refuses (raises
LocalServerError, as ``start`` does when llama-server exits) an adapter file holding ``BAD``.
"""

from __future__ import annotations

import json
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

from dspy_anyscale.servers import llama_server

FAKE_PYTHON = r"""
import json, os, sys, time
from pathlib import Path
mode = os.environ.get("FAKE_MODE", "ok")
script = Path(sys.argv[1]).name
if script == "_train_lora.py":
    spec = json.loads(Path(sys.argv[2]).read_text())
    print("loaded base", spec["base_gguf"], flush=True)
    if mode == "train-crash":
        print("Traceback (most recent call last):\nRuntimeError: CUDA out of memory (fake)", flush=True)
        sys.exit(3)
    if mode == "train-hang":
        (Path(sys.argv[2]).parent / "pid").write_text(str(os.getpid()))
        time.sleep(600)
    out = Path(spec["output"])
    (out / "adapter").mkdir(parents=True)
    (out / "base").mkdir(parents=True)
    (out / "adapter" / "adapter_model.safetensors").write_bytes(b"weights")
    (out / "adapter" / "adapter_config.json").write_text("{}")
    (out / "base" / "config.json").write_text("{}")
    sys.exit(0)
if script == "convert_lora_to_gguf.py":
    outfile = Path(sys.argv[sys.argv.index("--outfile") + 1])
    if mode == "convert-fail":
        print("ERROR: Model LlamaForCausalLM is not supported (fake)", flush=True)
        sys.exit(1)
    if mode == "convert-junk":
        sys.exit(0)
    outfile.write_bytes(b"GGUF" + (b"BAD" if mode == "refuse" else b"adapter"))
    sys.exit(0)
sys.exit(f"fake python: unexpected {sys.argv}")
"""


@pytest.fixture
def fake_python(tmp_path: Path) -> Path:
    path = tmp_path / "fake-python"
    path.write_text(f"#!{sys.executable}\n{FAKE_PYTHON}")
    path.chmod(0o755)
    return path


class FakeServer:
    """A stand-in llama-server: /health and /lora-adapters on 127.0.0.1."""

    def __init__(self, port: int | None, lora: list[Path]) -> None:
        adapters = [{"id": k, "path": str(p), "scale": 0.0} for k, p in enumerate(lora)]

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                body = json.dumps(adapters if self.path == "/lora-adapters" else {"status": "ok"}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: Any) -> None:
                pass

        self._httpd = ThreadingHTTPServer(("127.0.0.1", port or 0), Handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self.lora = list(lora)
        self.stopped = False
        threading.Thread(target=self._httpd.serve_forever, daemon=True).start()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def stop(self, timeout: float | None = None) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self.stopped = True


class FakeStart:
    """``llama_server.start``'s stand-in; remembers every server it started."""

    def __init__(self) -> None:
        self.servers: list[FakeServer] = []

    def __call__(self, *, port: int | None, api_key: str | None, lora: list[Path], ready_timeout: float) -> FakeServer:
        paths = [Path(p) for p in lora]
        if any(b"BAD" in p.read_bytes() for p in paths):
            raise llama_server.LocalServerError("llama-server exited: failed to apply lora adapter (fake)")
        server = FakeServer(port, paths)
        self.servers.append(server)
        return server

    @property
    def running(self) -> list[FakeServer]:
        return [s for s in self.servers if not s.stopped]


@pytest.fixture
def fake_start() -> FakeStart:
    return FakeStart()


@pytest.fixture
def no_converter_install(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """The converter's path without installing llama.cpp (the fake python only looks at its name)."""
    converter = tmp_path / "llama.cpp" / "convert_lora_to_gguf.py"
    converter.parent.mkdir()
    converter.write_text("# stand-in\n")
    monkeypatch.setattr(llama_server, "ensure_converter", lambda **_: converter)
    return converter
