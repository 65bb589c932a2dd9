"""What a compiled train step does, read from its HLO text (per device, per step): the
collectives XLA inserted inside a slice, and the transfers between slices of a
multislice TPU program (over the data-centre network, DCN).

An op inside a while body (the layer scan, gradient accumulation) runs once per trip,
so every figure multiplies an op by how often its computation runs (:class:`Program`).
Used by ``unifer compile-check``; the tests compile small programs for real targets
and check these counts against hand-counted ones.
"""

from __future__ import annotations

import math
import re

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_OP = re.compile(r'=\s*(\([^=]*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$')
_WHILE = re.compile(r'\bwhile\(.*\bcondition=%?([\w.-]+), body=%?([\w.-]+)')
_CALLED = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.-]+)|branch_computations=\{([^}]*)\}')
_ARRAY = re.compile(r'\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
_DEF = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*.*?\s([\w-]+)\((.*?)\)(?:,|$)')
# A multislice TPU program sends each cross-slice collective through the megascale
# runtime as a host-transfer recv/send pair tagged with the collective it implements.
_DCN_RECV = re.compile(r'=\s*(\([^=]*?\))\s+recv\(.*_xla_megascale_transfer_type="(\w+)"')


def array_bytes(type_text: str, largest: bool = False) -> int:
  """Bytes of the arrays in an HLO type (``f32[8,128]{1,0}``, or a tuple of them): their
  sum, or the largest one."""
  sizes = []
  for dtype, dims in _ARRAY.findall(type_text):
    bits = 1 if dtype == 'pred' else int(re.search(r'\d+', dtype).group())
    sizes.append(math.prod(int(d) for d in dims.split(',') if d) * max(bits // 8, 1))
  return (max(sizes) if largest else sum(sizes)) if sizes else 0


class Program:
  """Compiled HLO text split into computations, with how often each runs per step.

  A while body runs its loop's trip count times per run of its caller (read from the
  condition, ``i < N``, or the GPU compiler's ``known_trip_count``); any other called
  computation (fusion, reducer, branch) once per run of its caller.
  """

  def __init__(self, hlo_text: str):
    self.computations: dict[str, list[str]] = {}
    current = None
    for line in hlo_text.splitlines():
      head = _HEADER.match(line)
      if head and not line[0].isspace():  # computation headers start at column 0
        current = head.group(1)
        self.computations[current] = []
      elif current is not None:
        self.computations[current].append(line)
    self._callers = {name: [] for name in self.computations}  # callee -> [(caller, trips)]
    for name, lines in self.computations.items():
      for line in lines:
        trips = {}
        loop = _WHILE.search(line)
        if loop:
          cond, body = loop.groups()
          trips[body] = self._trip_count(line, cond, lines)
        for one, many in _CALLED.findall(line):
          for callee in (c.strip().lstrip('%') for c in (one or many).split(',')):
            if callee in self._callers:
              self._callers[callee].append((name, trips.get(callee, 1)))
    self._runs: dict[str, int] = {}

  def _trip_count(self, line: str, cond: str, caller: list[str]) -> int:
    """``limit - start`` of a ``counter < limit`` loop; ``start`` read from the loop's
    initial tuple (XLA peels the first iteration of a pipelined loop out of it, starting
    the counter at 1); 1 when the loop has no such form."""
    known = _KNOWN_TRIPS.search(line)
    if known:
      return int(known.group(1))
    defs = _definitions(self.computations.get(cond, []))
    for op, args in defs.values():
      if op != 'compare' or 'direction=LT' not in args:
        continue
      counter, limit = (a.strip().lstrip('%') for a in args.split(')')[0].split(',')[:2])
      limit, counter = _constant(defs, limit), defs.get(counter)
      if limit is None or counter is None or counter[0] != 'get-tuple-element':
        continue
      index = re.search(r'index=(\d+)', counter[1])
      start = self._initial(line, int(index.group(1)), caller) if index else None
      return max(limit - (start or 0), 0)
    return 1

  @staticmethod
  def _initial(while_line: str, index: int, caller: list[str]) -> int | None:
    """The constant a while loop's tuple element ``index`` starts at, if it is one."""
    init = re.search(r'\bwhile\(%?([\w.-]+)\)', while_line)
    defs = _definitions(caller)
    if not init or defs.get(init.group(1), ('',))[0] != 'tuple':
      return None
    operands = re.sub(r'/\*.*?\*/', '', defs[init.group(1)][1]).split(',')
    return _constant(defs, operands[index].strip().lstrip('%')) if index < len(operands) else None

  def runs(self, name: str, seen: tuple = ()) -> int:
    """Executions of computation ``name`` per run of the program."""
    if name not in self._runs:
      callers = self._callers[name]
      self._runs[name] = 1 if not callers else sum(  # ENTRY (and unreferenced helpers): 1
          self.runs(c, seen + (name,)) * t for c, t in callers if c not in seen)
    return self._runs[name]

  def lines(self):
    """(computation name, line) for every instruction line."""
    for name, lines in self.computations.items():
      for line in lines:
        yield name, line


def _definitions(lines: list[str]) -> dict[str, tuple[str, str]]:
  """{instruction name: (opcode, the text after its opening parenthesis)}."""
  out = {}
  for line in lines:
    found = _DEF.match(line)
    if found:
      out[found.group(1)] = (found.group(2), line[found.start(3):])
  return out


def _constant(defs: dict, name: str, depth: int = 4) -> int | None:
  """The integer value of ``name``, following copies to a scalar constant."""
  op, args = defs.get(name, ('', ''))
  if op == 'constant':
    value = re.match(r'\s*(-?\d+)\)', args)
    return int(value.group(1)) if value else None
  if op == 'copy' and depth:
    return _constant(defs, args.split(')')[0].strip().lstrip('%'), depth - 1)
  return None


def _record(stats: dict, biggest: list, op: str, runs: int, size: int, shown: str, line: str):
  entry = stats.setdefault(op, {'ops': 0, 'runs': 0, 'bytes': 0})
  entry['ops'] += 1
  entry['runs'] += runs
  entry['bytes'] += runs * size
  op_name = _OP_NAME.search(line)
  biggest.append((runs * size, op, shown, op_name.group(1) if op_name else ''))


def collective_stats(hlo: str | Program) -> tuple[dict, list]:
  """Collectives inside a slice (or on one GPU host), per device per step.

  Returns ({op: {'ops': static count, 'runs': executions, 'bytes': result bytes moved}},
  the 3 biggest ops by bytes as (bytes, op, result type, jax op name)). An async
  start/done pair counts once. TPU's compiler often writes an FSDP all-gather as an
  all-reduce of a zero-padded buffer (and a reduce-scatter as an all-reduce and a
  slice), so there the bytes say more than the op names. An async collective XLA moved
  into a loop body to overlap it with the loop is counted every iteration: an upper
  bound.
  """
  program = hlo if isinstance(hlo, Program) else Program(hlo)
  stats = {op: {'ops': 0, 'runs': 0, 'bytes': 0} for op in COLLECTIVES}
  biggest = []
  for name, line in program.lines():
    for type_text, op, start in _OP.findall(line):
      # An async *-start returns (operands, results): its largest array is the result.
      size = array_bytes(type_text, largest=bool(start))
      arrays = ['{}[{}]'.format(*a) for a in _ARRAY.findall(type_text)]
      shown = arrays[-1] if start else ', '.join(arrays)
      _record(stats, biggest, op, program.runs(name), size, shown, line)
  return stats, sorted(biggest, reverse=True)[:3]


def dcn_stats(hlo: str | Program) -> tuple[dict, list]:
  """Cross-slice collectives of a multislice TPU program, per device per step: the same
  shape as :func:`collective_stats`, keyed by the collective each transfer implements
  ('all-reduce', 'all-gather', ...), bytes = what each device receives over the DCN.
  Empty for a one-slice program."""
  program = hlo if isinstance(hlo, Program) else Program(hlo)
  stats, biggest = {}, []
  for name, line in program.lines():
    found = _DCN_RECV.search(line)
    if found:
      type_text, kind = found.groups()
      payload = _ARRAY.search(type_text)  # (data, u32[] context, token[])
      shown = '{}[{}]'.format(*payload.groups()) if payload else '?'
      size = array_bytes(shown) if payload else 0
      _record(stats, biggest, kind.lower().replace('_', '-'), program.runs(name), size,
              shown, line)
  return stats, sorted(biggest, reverse=True)[:3]
