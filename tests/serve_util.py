"""`unifer serve` as a user starts it (a subprocess on a free loopback port), and raw HTTP
to it with the standard library: the malformed-upload tests need bodies no client
library would send."""

import contextlib
import http.client
import io
import json
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
from PIL import Image

REPO = Path(__file__).resolve().parents[1]


def jpeg(image: np.ndarray, quality: int = 90) -> bytes:
  """``image`` (uint8 HxWx3) as JPEG bytes, the upload a browser sends."""
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def free_port() -> int:
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


class Server:
  """A running `unifer serve`; ``.port``, ``.proc``, ``.log()``."""

  def __init__(self, proc, port, log_path):
    self.proc, self.port, self.log_path = proc, port, log_path

  def log(self) -> str:
    return Path(self.log_path).read_text()

  def rss_mb(self) -> float:
    status = Path(f'/proc/{self.proc.pid}/status').read_text()
    return int(next(l for l in status.splitlines() if l.startswith('VmRSS:')).split()[1]) / 1024

  def request(self, method, path, body=None, headers=None, timeout=60):
    """(status, parsed JSON or text, headers) of one request on a fresh connection."""
    conn = http.client.HTTPConnection('127.0.0.1', self.port, timeout=timeout)
    try:
      conn.request(method, path, body=body, headers=headers or {})
      r = conn.getresponse()
      data = r.read()
      ctype = r.getheader('content-type', '')
      parsed = json.loads(data) if ctype.startswith('application/json') else data.decode('latin-1')
      return r.status, parsed, dict(r.getheaders())
    finally:
      conn.close()

  def early_answer(self, head: str, body: bytes, timeout=30):
    """(status, JSON) for a request whose answer may come before its body has been sent
    (an over-limit upload): ``head`` is the request line + headers, ``body`` is sent in
    64 KB pieces for as long as the server reads them."""
    with socket.create_connection(('127.0.0.1', self.port), timeout=timeout) as sock:
      sock.sendall(head.replace('\n', '\r\n').encode() + b'\r\n')
      try:
        for i in range(0, len(body), 2**16):
          sock.sendall(body[i:i + 2**16])
      except (BrokenPipeError, ConnectionResetError):
        pass   # the server answered and closed without reading the rest
      r = http.client.HTTPResponse(sock)
      r.begin()
      return r.status, json.loads(r.read()), dict(r.getheaders())

  def analyze(self, data: bytes, filename='face.png', content_type='image/png', query='',
              timeout=60):
    body, ctype = multipart({'file': (filename, content_type, data)})
    return self.request('POST', '/api/analyze' + query, body, {'Content-Type': ctype},
                        timeout=timeout)


def multipart(fields: dict) -> tuple[bytes, str]:
  """A multipart/form-data body: {name: (filename, content_type, bytes) or str}."""
  boundary = uuid.uuid4().hex
  out = io.BytesIO()
  for name, value in fields.items():
    out.write(f'--{boundary}\r\n'.encode())
    if isinstance(value, tuple):
      filename, ctype, data = value
      out.write(f'Content-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                f'Content-Type: {ctype}\r\n\r\n'.encode() + data + b'\r\n')
    else:
      out.write(f'Content-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
  out.write(f'--{boundary}--\r\n'.encode())
  return out.getvalue(), f'multipart/form-data; boundary={boundary}'


@contextlib.contextmanager
def serve(model_dir, *args, cwd=None, env=None, log_path=None, timeout=60):
  """`unifer serve --model model_dir --port P *args` until the block ends."""
  port = free_port()
  log_path = log_path or Path(cwd or '.') / f'serve-{port}.log'
  environ = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [str(REPO)] + [p for p in os.environ.get('PYTHONPATH', '').split(os.pathsep) if p]))
  environ.update(env or {})
  with open(log_path, 'w') as log:
    proc = subprocess.Popen([sys.executable, '-m', 'unifer_jax.cli', 'serve', '--model',
                             str(model_dir), '--port', str(port), *args],
                            stdout=log, stderr=subprocess.STDOUT, cwd=cwd, env=environ)
  server = Server(proc, port, log_path)
  try:
    deadline = time.monotonic() + timeout
    while True:
      if proc.poll() is not None:
        raise RuntimeError(f'unifer serve exited {proc.returncode}:\n{server.log()}')
      try:
        if server.request('GET', '/api/health', timeout=5)[0] == 200:
          break
      except OSError:
        pass
      if time.monotonic() > deadline:
        raise RuntimeError(f'unifer serve did not answer in {timeout} s:\n{server.log()}')
      time.sleep(0.2)
    yield server
  finally:
    proc.terminate()
    try:
      proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
      proc.kill()
      proc.wait()


def png_bytes(image: np.ndarray) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


def jpeg_bytes(image: np.ndarray, quality: int = 90) -> bytes:
  buf = io.BytesIO()
  Image.fromarray(image).save(buf, format='JPEG', quality=quality)
  return buf.getvalue()


def astronaut() -> np.ndarray:
  from skimage import data  # pylint: disable=g-import-not-at-top
  return data.astronaut()
