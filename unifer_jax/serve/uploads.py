"""An upload, from the request's bytes to pixels: capped, in memory, never trusted.

* ``read_file_field(content_type, chunks, limits)``: the multipart body's ``file`` part,
  parsed while it streams in (python-multipart's push parser) and kept in memory; the
  body is refused past ``limits.max_bytes`` without reading the rest. Nothing is ever
  written to disk (Starlette's own form parser spools parts over 1 MB to a temporary
  file, so it is not used).
* ``decode(data, limits)``: only JPEG, PNG, WebP, BMP and GIF are opened (Pillow's other
  plugins include formats that call out to external programs); the pixel count is read
  from the header and refused before any decoding; a truncated or corrupt file is
  refused, never decoded half-way; EXIF orientation is applied, as browsers show it;
  the pixels come back with the longer side at most WORK_SIDE (a big JPEG is decoded at a
  reduced scale straight away), with the full size to map boxes back.

Every refusal is an ``UploadError(status, message)``: 400 malformed, 413 too large,
415 not a supported image.
"""

from __future__ import annotations

import dataclasses
import io
from typing import AsyncIterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError
from python_multipart.multipart import MultipartParser, parse_options_header

# Pillow opens the multi-picture JPEGs many phone cameras write (format 'MPO') as JPEG.
FORMATS = ('JPEG', 'PNG', 'WEBP', 'BMP', 'GIF')
FIELD = 'file'
ORIENTATION = 0x0112   # the EXIF tag
# Images are analysed with their longer side at most this: the detector works on a 320 px
# copy and the crops are <= 224 px, so a 12 MP photo loses nothing but ~100 MB and time.
WORK_SIDE = 1600


@dataclasses.dataclass(frozen=True)
class Limits:
  max_bytes: int = 20 * 2**20        # an upload's body
  max_pixels: int = 50_000_000       # width x height, read from the header
  max_faces: int = 16                # the largest faces of one image are analysed


class UploadError(Exception):
  def __init__(self, status: int, message: str):
    super().__init__(message)
    self.status = status
    self.message = message


def _mb(n: int) -> str:
  return f'{n / 2**20:.3g} MB'


class _FilePart:
  """python-multipart callbacks that keep the first part named FIELD."""

  def __init__(self):
    self.header_field, self.header_value = b'', b''
    self.headers: dict[bytes, bytes] = {}
    self.current: list[bytes] | None = None
    self.data: bytes | None = None
    self.filename = ''
    self.content_type = ''

  def callbacks(self) -> dict:
    return dict(on_part_begin=self._begin, on_header_field=self._field,
                on_header_value=self._value, on_header_end=self._header_end,
                on_headers_finished=self._headers_done, on_part_data=self._data,
                on_part_end=self._end)

  def _begin(self):
    self.headers, self.current = {}, None

  def _field(self, data, start, end):
    self.header_field += data[start:end]

  def _value(self, data, start, end):
    self.header_value += data[start:end]

  def _header_end(self):
    self.headers[self.header_field.strip().lower()] = self.header_value.strip()
    self.header_field, self.header_value = b'', b''

  def _headers_done(self):
    _, params = parse_options_header(self.headers.get(b'content-disposition', b''))
    if params.get(b'name') == FIELD.encode() and self.data is None:
      self.current = []
      self.filename = params.get(b'filename', b'').decode('utf-8', 'replace')
      self.content_type = self.headers.get(b'content-type', b'').decode('latin-1')

  def _data(self, data, start, end):
    if self.current is not None:
      self.current.append(bytes(data[start:end]))

  def _end(self):
    if self.current is not None:
      self.data, self.current = b''.join(self.current), None


async def read_file_field(content_type: str | None, content_length: str | None,
                          chunks: AsyncIterator[bytes], limits: Limits) -> tuple[bytes, str]:
  """(the ``file`` part's bytes, its filename) of a multipart/form-data body."""
  ctype, params = parse_options_header(content_type or '')
  if ctype != b'multipart/form-data' or not params.get(b'boundary'):
    raise UploadError(415, f'expected a multipart/form-data upload with a "{FIELD}" field, '
                           f'got Content-Type {content_type or "(none)"!r}')
  if content_length is not None:
    if not content_length.isdigit():
      raise UploadError(400, f'bad Content-Length {content_length!r}')
    if int(content_length) > limits.max_bytes:
      raise UploadError(413, f'the upload is {_mb(int(content_length))}; the limit is '
                             f'{_mb(limits.max_bytes)}')
  part = _FilePart()
  parser = MultipartParser(params[b'boundary'], part.callbacks())
  seen = 0
  try:
    async for chunk in chunks:
      seen += len(chunk)
      if seen > limits.max_bytes:
        raise UploadError(413, f'the upload goes past the limit of {_mb(limits.max_bytes)}')
      parser.write(chunk)
    parser.finalize()
  except UploadError:
    raise
  except Exception as e:  # python-multipart's parse errors have no common base class
    raise UploadError(400, f'malformed multipart body ({type(e).__name__}: '
                           f'{str(e)[:100]})') from None
  if part.data is None:
    raise UploadError(400, f'no "{FIELD}" field in the upload')
  return part.data, part.filename


def decode(data: bytes, limits: Limits, work_side: int = WORK_SIDE) -> tuple[np.ndarray, tuple]:
  """(uint8 [H, W, 3] RGB, upright, longer side at most `work_side`; the upright image's
  full (width, height)). UploadError when the bytes are not a usable image."""
  if not data:
    raise UploadError(400, 'the file is empty')
  try:
    with Image.open(io.BytesIO(data), formats=FORMATS) as im:
      w, h = im.size
      if w * h > limits.max_pixels:
        raise UploadError(413, f'the image is {w} x {h} pixels; the limit is '
                               f'{limits.max_pixels / 1e6:.0f} megapixels')
      if im.getexif().get(ORIENTATION) in (5, 6, 7, 8):
        w, h = h, w
      k = max(w, h) / work_side
      if im.format in ('JPEG', 'MPO') and k > 1:   # decode at 1/2, 1/4 or 1/8 scale: less memory
        im.draft('RGB', (int(im.size[0] / k) + 1, int(im.size[1] / k) + 1))
      im.load()
      rgb = ImageOps.exif_transpose(im).convert('RGB')
  except UploadError:
    raise
  except UnidentifiedImageError:
    raise UploadError(415, 'not an image (or not one of JPEG, PNG, WebP, BMP, GIF)') from None
  except Image.DecompressionBombError:
    raise UploadError(413, f'the image claims over {2 * Image.MAX_IMAGE_PIXELS / 1e6:.0f} '
                           f'megapixels; the limit is {limits.max_pixels / 1e6:.0f}') from None
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    detail = str(e).splitlines()[0][:100] if str(e) else 'no detail'
    raise UploadError(400, f'a corrupt or truncated image ({type(e).__name__}: {detail})') from None
  if max(rgb.size) > work_side:
    k = work_side / max(rgb.size)
    rgb = rgb.resize((max(1, round(rgb.size[0] * k)), max(1, round(rgb.size[1] * k))),
                     Image.BILINEAR)
  return np.asarray(rgb), (w, h)
