"""DFEW, FERV39k and MAFW: clip records (schema.py: T = 16 `frames` + the middle one as
`image`) from the layouts they ship (DATASETS.md "Video sets").

Index: the common annotation txt of DFER-CLIP / Exp-CLIP, one clip a line,

  /any/prefix/DFEW/Clip/clip_224x224/00025 95 5        <frame_dir> <num_frames> <label>

looked for under --src as `annotation/<NAME>_{train,test}.txt` or `<NAME>_...txt`, NAME
being DFEW_set_<k> / MAFW_set_<k> (the fold is the config: fold1..fold5) or FERV39k.
The frame_dir is found on this machine by its trailing path components under --src.
When it is not there, the clip's video of the same name is decoded instead (DFEW:
Clip/original/**/<name>.mp4|avi, MAFW: data/clips/<name>.mp4): see clips.py for how
frames are sampled and faces cut. DFEW without annotation txts: its official split
CSVs `EmoLabel_DataSplit/{train,test}(single-labeled)/set_<k>.csv` (`video_name,label`)
with the frames at Clip/clip_224x224/<05d> (else the videos).

Labels (the txt codes; DFEW's and FERV39k's own order, MAFW's as DFER-CLIP numbers it):
  DFEW, FERV39k 1..7: happiness, sadness, neutral, anger, surprise, disgust, fear.
  MAFW 1..11: happiness, sadness, neutral, anger, surprise, disgust, fear, contempt,
    anxiety, helplessness, disappointment -- MAFW's own class names, in DFER-CLIP's
    numbering (its class_names_11), not the release's listing order (anger, disgust,
    fear, happiness, neutral, sadness, surprise, contempt, anxiety, ...).
  The first eight are labels.BASIC classes. anxiety, helplessness and disappointment are
  not: by default their clips are excluded (listed under "excluded by the dataset
  protocol", not counted as skips); `other_classes='keep'` writes them with expression
  -1 (every record's `nuisance` holds '{"mafw_class": "<name>"}' for 11-class scoring).
Bad lines are skipped and reported by file:line: malformed line, unknown label code,
missing folder / video, fewer frame files than num_frames, an unreadable frame or video.

Run (the folder as it ships, plus the annotation/ folder of DFER-CLIP if you use it):

  unifer prep dfew --src /data/DFEW --out /data/tfds --config fold1 --workers 8
  unifer prep ferv39k --src /data/FERV39k --out /data/tfds
  unifer prep mafw --src /data/MAFW --out /data/tfds --config fold1

-> OUT/dfew/fold1/1.0.0 with splits train / test (FERV39k: its train / test lists).
Expect 16 face_size^2 JPEGs per clip. Measured 2026-12-07 (2 shared cores): a
100-frame 1280x720 mp4 clip takes 0.34 s (one decoding pass 0.12 s -- a second, counting
pass only when the container does not declare its length --, face detection 0.11 s, 16
crops the rest); 8 clips of 60 frames at 320x240 build in 2.2 s with --workers 1, 4.6 s
with 2 (process start-up dominates at this size) and with --runner DirectRunner, the
same frames bytes for bytes. tests/test_builders_video.py builds all three from fixtures
with every kind of bad input in ~3 s.
"""

import csv
import os

from data_prep.builders import clips, common

DFEW_CODES = {1: 'happiness', 2: 'sadness', 3: 'neutral', 4: 'anger', 5: 'surprise',
              6: 'disgust', 7: 'fear'}
FERV39K_CODES = dict(DFEW_CODES)
MAFW_CODES = dict(enumerate(
    ('happiness', 'sadness', 'neutral', 'anger', 'surprise', 'disgust', 'fear', 'contempt',
     'anxiety', 'helplessness', 'disappointment'), 1))
SPLITS = ('train', 'test')
FOLDS = {f'fold{k}': {'fold': k} for k in range(1, 6)}


class AnnotatedClips(clips.ClipSource):
  """A clip dataset indexed by the common annotation txt; subclasses set the names."""

  codes: dict = {}
  video_folders: tuple = ()

  def __init__(self, src, *, fold: int = 0, other_classes: str = 'exclude', **kwargs):
    super().__init__(src, **kwargs)
    if other_classes not in ('exclude', 'keep'):
      raise ValueError(f"other_classes must be 'exclude' or 'keep', got {other_classes!r}")
    self.fold, self.keep_other = int(fold), other_classes == 'keep'

  def annotation_stem(self) -> str:
    raise NotImplementedError

  def annotation_files(self) -> dict:
    """split -> the annotation txt under src, or {} when none is there."""
    stem = self.annotation_stem()
    found = {}
    for split in SPLITS:
      for folder in ('annotation', 'annotations', ''):
        p = os.path.join(self.src, folder, f'{stem}_{split}.txt')
        if os.path.isfile(p):
          found[split] = p
          break
    return found

  def scan(self, tally):
    files = self.annotation_files()
    if not files:
      return self.scan_without_annotation(tally)
    videos = self.video_index(*self.video_folders)
    units = {}
    for split, path in files.items():
      good, bad = clips.read_annotation(path, self.rel)
      for where, line in bad:
        tally.add(common.Skipped(common.MALFORMED, where, repr(line)))
      seen = {}
      units[split] = [c for c in (
          self.clip_from_line(where, frame_dir, n, code, self.codes, tally, videos=videos,
                              keep_other=self.keep_other, seen=seen)
          for where, frame_dir, n, code in good) if c is not None]
    return units

  def scan_without_annotation(self, tally):
    del tally
    stem = self.annotation_stem()
    raise FileNotFoundError(
        f'{self.name}: no {stem}_train.txt / {stem}_test.txt under --src {self.src} (or its '
        f'annotation/ folder); expected lines "<frame_dir> <num_frames> <label>" (DATASETS.md)')


class Dfew(AnnotatedClips):
  """DFEW: 16,372 clips, 5 folds, 7 classes; frame folders or the original videos."""

  name = 'dfew'
  description = __doc__
  configs = FOLDS
  codes = DFEW_CODES
  video_folders = ('Clip/original',)

  def annotation_stem(self):
    return f'DFEW_set_{self.fold}'

  def scan_without_annotation(self, tally):
    """The official split CSVs: `video_name,label` rows (1-based names, 05d folders)."""
    videos = self.video_index(*self.video_folders)
    frames_root = os.path.join('Clip', 'clip_224x224')
    units = {}
    for split in SPLITS:
      path = self.find(os.path.join('EmoLabel_DataSplit', f'{split}(single-labeled)',
                                    f'set_{self.fold}.csv'))
      units[split], seen = [], {}
      with open(path, encoding='utf-8-sig', errors='replace') as f:
        for lineno, row in enumerate(csv.reader(f), 1):
          if lineno == 1 or not any(c.strip() for c in row):
            continue   # the header 'video_name,label'
          where = f'{self.rel(path)}:{lineno}'
          number = common.parse_int(row[0]) if len(row) == 2 else None
          code = common.parse_int(row[1]) if len(row) == 2 else None
          if number is None or code is None:
            tally.add(common.Skipped(common.MALFORMED, where, repr(','.join(row))))
            continue
          c = self.clip_from_line(where, os.path.join(frames_root, f'{number:05d}'), 0, code,
                                  self.codes, tally, videos=videos, seen=seen)
          if c is not None:
            units[split].append(c)
    return units


class Ferv39k(AnnotatedClips):
  """FERV39k: 38,935 clips (31,088 train / 7,847 test), 7 classes; face-crop frame folders."""

  name = 'ferv39k'
  description = __doc__
  codes = FERV39K_CODES

  def annotation_stem(self):
    return 'FERV39k'


class Mafw(AnnotatedClips):
  """MAFW: 10,045 clips, 5 folds, 11 classes (8 of them in labels.BASIC)."""

  name = 'mafw'
  description = __doc__
  configs = FOLDS
  codes = MAFW_CODES
  video_folders = ('data/clips', 'clips')

  def annotation_stem(self):
    return f'MAFW_set_{self.fold}'
