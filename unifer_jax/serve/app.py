"""The ASGI app behind `unifer serve`: one page and a three-route JSON API (Starlette).

  GET  /                 the page (static/index.html; its scripts and style under /static/)
  GET  /api/health       {"status": "ok", "model": {...which back end, from where}, "limits"}
  POST /api/analyze      multipart `file` -> {"width", "height", "faces": [...], "ms"}
                         (analysis.py gives the face fields); `?stream=ID` marks a webcam
                         frame: faces are tracked across that stream's frames (tracking.py)
                         and a frame without faces is an answer, not an error

Every error is JSON ``{"error": "..."}`` with a 4xx status (a 500 says only "internal
error" and the traceback goes to the server's log). The page's files are read once into
memory and served by name: no request maps to a path on disk. Analyses run in worker
threads, at most ``workers`` at a time (the machine's cores: more would only share them).

  app = create_app(analysis.Backend.load('workdir/demo'))   # then any ASGI server
"""

from __future__ import annotations

import collections
import logging
import re
import threading
import time
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from unifer_jax.serve import analysis, tracking, uploads

STATIC = Path(__file__).with_name('static')
PAGE_FILES = {'app.js': 'text/javascript', 'reports.js': 'text/javascript',
              'webcam.js': 'text/javascript', 'style.css': 'text/css'}
# The page loads nothing from elsewhere; the camera's frames are blob: URLs.
HEADERS = [(b'content-security-policy',
            b"default-src 'self'; img-src 'self' data: blob:; media-src 'self' blob: mediastream:; "
            b"object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
           (b'x-content-type-options', b'nosniff'), (b'referrer-policy', b'no-referrer'),
           (b'cache-control', b'no-store')]
LOOPBACK_HOSTS = ('127.0.0.1', 'localhost', '[::1]')
STREAM_ID = re.compile(r'[A-Za-z0-9_-]{1,64}')
log = logging.getLogger('unifer.serve')


def error(status: int, message: str) -> JSONResponse:
  return JSONResponse({'error': message}, status_code=status)


class Guard:
  """ASGI middleware: security headers on every response and, for a loopback server, a
  Host check (a web page elsewhere cannot reach it through DNS rebinding)."""

  def __init__(self, app, allowed_hosts):
    self.app, self.allowed = app, allowed_hosts

  async def __call__(self, scope, receive, send):
    if scope['type'] != 'http':
      return await self.app(scope, receive, send)
    if self.allowed is not None:
      host = dict(scope['headers']).get(b'host', b'').decode('latin-1')
      name = host.rsplit(':', 1)[0] if not host.endswith(']') else host
      if name not in self.allowed:
        return await error(400, f'Host {host!r} refused: this server answers on loopback '
                                f'only (unifer serve --host to change that)')(scope, receive, send)

    async def with_headers(message):
      if message['type'] == 'http.response.start':
        message.setdefault('headers', [])
        message['headers'] = list(message['headers']) + HEADERS
      await send(message)

    await self.app(scope, receive, with_headers)


class Streams:
  """Webcam streams by id: a tracker each, the least recently used dropped past `keep`."""

  def __init__(self, keep: int = 16, detect_every: int = 8):
    self.keep, self.detect_every = keep, detect_every
    self.streams: collections.OrderedDict = collections.OrderedDict()
    self.lock = threading.Lock()

  def get(self, stream_id: str):
    with self.lock:
      if stream_id not in self.streams:
        self.streams[stream_id] = (tracking.Tracker(self.detect_every), threading.Lock())
        while len(self.streams) > self.keep:
          self.streams.popitem(last=False)
      self.streams.move_to_end(stream_id)
      return self.streams[stream_id]


def create_app(backend: analysis.Backend, *, limits: uploads.Limits = uploads.Limits(),
               loopback_only: bool = True, workers: int = 2, detect_every: int = 8):
  """The ASGI application (Starlette inside the Guard middleware)."""
  page = (STATIC / 'index.html').read_bytes()
  files = {name: (STATIC / name).read_bytes() for name in PAGE_FILES}
  limiter = anyio.CapacityLimiter(workers)
  streams = Streams(detect_every=detect_every)
  described = {'status': 'ok', 'model': backend.describe(),
               'limits': {'max_bytes': limits.max_bytes, 'max_pixels': limits.max_pixels,
                          'max_faces': limits.max_faces},
               'detect_every': detect_every}

  async def index(request: Request) -> Response:
    return Response(page, media_type='text/html; charset=utf-8')

  async def static(request: Request) -> Response:
    name = request.path_params['name']
    if name not in files:
      return error(404, f'no page file {name!r}')
    return Response(files[name], media_type=PAGE_FILES[name] + '; charset=utf-8')

  async def health(request: Request) -> Response:
    return JSONResponse(described)

  def run(data: bytes, stream_id: str | None) -> dict:
    image, size = uploads.decode(data, limits)
    if stream_id is None:
      return analysis.analyze(image, size, backend, max_faces=limits.max_faces)
    tracker, lock = streams.get(stream_id)
    with lock:   # a stream's frames in order, one at a time
      return analysis.analyze(image, size, backend, max_faces=limits.max_faces,
                              tracker=tracker)

  async def analyze(request: Request) -> Response:
    t = time.perf_counter()
    stream_id = request.query_params.get('stream')
    if stream_id is not None and not STREAM_ID.fullmatch(stream_id):
      return error(400, 'stream ids are 1-64 letters, digits, - or _')
    try:
      data, name = await uploads.read_file_field(
          request.headers.get('content-type'), request.headers.get('content-length'),
          request.stream(), limits)
      answer = await anyio.to_thread.run_sync(run, data, stream_id, limiter=limiter)
    except uploads.UploadError as e:
      return error(e.status, e.message)
    except analysis.NoFace as e:
      return error(422, str(e))
    answer['ms'] = round((time.perf_counter() - t) * 1e3, 1)
    if name:
      answer['name'] = name
    return JSONResponse(answer)

  async def http_error(request: Request, exc: HTTPException) -> Response:
    return error(exc.status_code, exc.detail or 'error')

  async def server_error(request: Request, exc: Exception) -> Response:
    log.exception('unifer serve: %s %s failed', request.method, request.url.path)
    return error(500, 'internal error (the server log has the details)')

  app = Starlette(routes=[
      Route('/', index, methods=['GET']),
      Route('/static/{name}', static, methods=['GET']),
      Route('/api/health', health, methods=['GET']),
      Route('/api/analyze', analyze, methods=['POST']),
  ], exception_handlers={HTTPException: http_error, Exception: server_error})
  return Guard(app, LOOPBACK_HOSTS if loopback_only else None)
