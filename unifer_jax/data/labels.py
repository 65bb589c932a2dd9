"""Label vocabularies shared by every dataset builder, pipeline, head and evaluator.

The order of each tuple is the project's canonical index: records store indices into
these tuples (see `schema.py`), so never reorder them; append only.
"""

# 7 basic expressions + contempt (AffectNet's 8). Index 0 is neutral.
BASIC = (
    'neutral', 'happiness', 'sadness', 'surprise', 'fear', 'disgust', 'anger',
    'contempt',
)

# RAF-DB compound expressions, in RAF-DB's own label order (its compound labels 1..11
# map to indices 0..10 here).
COMPOUND = (
    'happily surprised', 'happily disgusted', 'sadly fearful', 'sadly angry',
    'sadly surprised', 'sadly disgusted', 'fearfully angry', 'fearfully surprised',
    'angrily surprised', 'angrily disgusted', 'disgustedly surprised',
)

# The basic components of each compound (first word's basic, second word's basic).
COMPOUND_COMPONENTS = {
    'happily surprised': ('happiness', 'surprise'),
    'happily disgusted': ('happiness', 'disgust'),
    'sadly fearful': ('sadness', 'fear'),
    'sadly angry': ('sadness', 'anger'),
    'sadly surprised': ('sadness', 'surprise'),
    'sadly disgusted': ('sadness', 'disgust'),
    'fearfully angry': ('fear', 'anger'),
    'fearfully surprised': ('fear', 'surprise'),
    'angrily surprised': ('anger', 'surprise'),
    'angrily disgusted': ('anger', 'disgust'),
    'disgustedly surprised': ('disgust', 'surprise'),
}

# FACS action units the project annotates: number -> FACS name. The dict order is the
# order of the `aus` vector in every record.
AUS = {
    1: 'inner brow raiser',
    2: 'outer brow raiser',
    4: 'brow lowerer',
    5: 'upper lid raiser',
    6: 'cheek raiser',
    7: 'lid tightener',
    9: 'nose wrinkler',
    10: 'upper lip raiser',
    12: 'lip corner puller',
    14: 'dimpler',
    15: 'lip corner depressor',
    17: 'chin raiser',
    20: 'lip stretcher',
    23: 'lip tightener',
    24: 'lip pressor',
    25: 'lips part',
    26: 'jaw drop',
}
AU_INDEX = {au: i for i, au in enumerate(AUS)}

# RAF-DB's manual annotations (list_patition_label / manual attribute files).
AGE_GROUPS = ('0-3', '4-19', '20-39', '40-69', '70+')
GENDERS = ('male', 'female', 'unsure')
RACES = ('caucasian', 'african-american', 'asian')


def index(vocab, name):
  """`vocab.index(name)` with an error that names the vocabulary's entries."""
  try:
    return vocab.index(name)
  except ValueError:
    raise ValueError(f'unknown label {name!r}; expected one of {list(vocab)}') from None
