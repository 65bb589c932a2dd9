"""Face-text builders: FaceCaption-15M-style parquet (embedded bytes, path column,
img2dataset shards, bare URLs) and CelebA-Dialog (captions.json + degree labels)."""

import io
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

import builders_util as u
from data_prep import registry
from data_prep.builders import common


def _jpeg(img):
  buf = io.BytesIO()
  img.save(buf, 'JPEG', quality=95)
  return buf.getvalue()


def _face_jpeg(value):
  """A 'face' image whose box (20..60, 10..50) is a bright square on a dark background."""
  arr = np.full((80, 100, 3), 20, np.uint8)
  arr[10:50, 20:60] = [value, 255 - value, 128]
  from PIL import Image  # pylint: disable=g-import-not-at-top
  return Image.fromarray(arr)


def test_facecaption(tmp_path):
  src, out = tmp_path / 'FaceCaption', tmp_path / 'out'
  box = [20.0, 10.0, 60.0, 50.0]
  scene = u.astronaut_face_scene()
  rows = [{'url': f'http://x/{i}.jpg', 'face_bbox': box, 'face_caption': f'face {i} smiling',
           'laion_caption': f'laion {i}', 'image': {'bytes': _jpeg(_face_jpeg(40 * i)), 'path': None},
           'image_path': None} for i in range(4)]
  rows.append({'url': 'http://x/p.jpg', 'face_bbox': box, 'face_caption': 'from a path',
               'laion_caption': '', 'image': None, 'image_path': 'imgs/p.jpg'})
  rows.append({'url': 'http://x/d.jpg', 'face_bbox': None, 'face_caption': 'detected',
               'laion_caption': '', 'image': {'bytes': _jpeg(scene), 'path': None},
               'image_path': None})
  bad = [
      {'url': 'http://x/u.jpg', 'face_bbox': box, 'face_caption': 'url only', 'laion_caption': '',
       'image': None, 'image_path': None},                                       # row 6: not fetched
      {'url': 'http://x/t.jpg', 'face_bbox': box, 'face_caption': 'cut', 'laion_caption': '',
       'image': {'bytes': _jpeg(_face_jpeg(9))[:300], 'path': None}, 'image_path': None},  # 7: truncated
      {'url': 'http://x/m.jpg', 'face_bbox': box, 'face_caption': 'gone', 'laion_caption': '',
       'image': None, 'image_path': 'imgs/missing.jpg'},                         # row 8: missing
      {'url': 'http://x/f.jpg', 'face_bbox': None, 'face_caption': 'flat', 'laion_caption': '',
       'image': {'bytes': _jpeg(_face_jpeg(0).resize((60, 60)).convert('L').convert('RGB')),
                 'path': None}, 'image_path': None},                             # row 9: no face
      {'url': 'http://x/b.jpg', 'face_bbox': [60.0, 10.0, 20.0, 50.0], 'face_caption': 'box',
       'laion_caption': '', 'image': {'bytes': _jpeg(_face_jpeg(1)), 'path': None},
       'image_path': None},                                                       # row 10: bad box
  ]
  (src / 'imgs').mkdir(parents=True)
  _face_jpeg(200).save(src / 'imgs' / 'p.jpg')
  pq.write_table(pa.Table.from_pylist(rows + bad), src / 'FaceCaption-v1.parquet', row_group_size=4)
  # An img2dataset shard: 00001.parquet + 00001/<key>.jpg, one row it failed to download.
  (src / 'shards' / '00001').mkdir(parents=True)
  _face_jpeg(100).save(src / 'shards' / '00001' / '000010000.jpg')
  pq.write_table(pa.Table.from_pylist([
      {'key': '000010000', 'status': 'success', 'url': 'http://y/0', 'face_bbox': box,
       'face_caption': 'downloaded'},
      {'key': '000010001', 'status': 'failed_to_download', 'url': 'http://y/1',
       'face_bbox': box, 'face_caption': 'lost'}]), src / 'shards' / '00001.parquet')

  report = registry.prepare('facecaption', src, out, max_skip_fraction=0.5, face_size=40,
                            face_margin=0.0)
  pf = 'FaceCaption-v1.parquet'
  assert report.written == {'train': 7}
  assert u.skipped_at(report, common.NOT_FETCHED) == [f'{pf}:row 6']
  assert u.skipped_at(report, common.UNREADABLE) == [f'{pf}:row 7']
  assert u.skipped_at(report, common.MISSING) == [f'{pf}:row 8']
  assert u.skipped_at(report, common.NO_FACE) == [f'{pf}:row 9']
  assert u.skipped_at(report, common.MALFORMED) == [f'{pf}:row 10']
  assert report.excluded == {"img2dataset status 'failed_to_download'": 1}
  assert 'download with img2dataset first' in report.examples[common.NOT_FETCHED][0]
  recs = u.records(out, 'facecaption', 'train')
  assert sorted(recs) == ['000010000', 'FaceCaption-v1/0', 'FaceCaption-v1/1', 'FaceCaption-v1/2',
                          'FaceCaption-v1/3', 'FaceCaption-v1/4', 'FaceCaption-v1/5']
  for i in range(4):
    r = recs[f'FaceCaption-v1/{i}']
    assert r['caption'] == f'face {i} smiling'.encode() and r['expression'] == -1
    assert r['image'].shape == (40, 40, 3)
    np.testing.assert_allclose(r['image'][20, 20], [40 * i, 255 - 40 * i, 128], atol=12)  # the box
  assert recs['000010000']['caption'] == b'downloaded'
  assert recs['FaceCaption-v1/5']['caption'] == b'detected'

  # Bare URLs only: the run fails and says why.
  urls = tmp_path / 'urls'
  urls.mkdir()
  pq.write_table(pa.Table.from_pylist([{'url': f'http://z/{i}', 'face_bbox': box,
                                        'face_caption': 'c'} for i in range(3)]),
                 urls / 'FaceCaption-v1.parquet')
  with pytest.raises(common.SkipFractionExceeded, match='fetching URLs is out of scope'):
    registry.prepare('facecaption', urls, tmp_path / 'o2')


def test_celeba_dialog(tmp_path):
  src, out = tmp_path / 'CelebA-Dialog', tmp_path / 'out'
  captions = {}
  degrees = ['30000', 'Bangs Eyeglasses No_Beard Smiling Young']   # count + header lines
  for i in range(6):
    u.image(str(src / 'image' / f'{i}.jpg'), (64, 64), value=i)
    captions[f'{i}.jpg'] = {'overall_caption': f'She is smiling {i}.',
                            'attribute_wise_captions': {'Smiling': 'x'}}
    degrees.append(f'{i}.jpg {i % 6} 0 1 {i} 2')
  degrees[-1] = '5.jpg 0 0 1 6 2'                  # line 8: degree 6 out of range (kept, no degrees)
  degrees.append('4.jpg 1 2')                       # line 9: malformed
  captions['6.jpg'] = {'attribute_wise_captions': {}}                     # no overall_caption
  captions['7.jpg'] = {'overall_caption': 'gone'}                          # missing image
  captions['8.jpg'] = {'overall_caption': 'cut'}                           # truncated
  u.truncated(str(src / 'image' / '8.jpg'))
  u.write(str(src / 'text' / 'captions.json'), json.dumps(captions))
  u.write(str(src / 'combined_annotation.txt'), '\n'.join(degrees) + '\n')
  report = registry.prepare('celeba_dialog', src, out, max_skip_fraction=0.6)
  assert report.written == {'train': 6}
  assert u.skipped_at(report, common.LABEL) == ['combined_annotation.txt:8']
  assert sorted(u.skipped_at(report, common.MALFORMED)) == ['combined_annotation.txt:9',
                                                            'text/captions.json:6.jpg']
  assert u.skipped_at(report, common.MISSING) == ['text/captions.json:7.jpg']
  assert u.skipped_at(report, common.UNREADABLE) == ['text/captions.json:8.jpg']
  recs = u.records(out, 'celeba_dialog', 'train')
  for i in range(5):
    r = recs[str(i)]
    assert r['caption'] == f'She is smiling {i}.'.encode()
    assert r['intensity'] == pytest.approx(i / 5)
    assert json.loads(r['nuisance'])['celeba_dialog_degrees']['smiling'] == i
    assert r['image'].shape == (64, 64, 3)
  assert np.isnan(recs['5']['intensity']) and recs['5']['nuisance'] == b''
