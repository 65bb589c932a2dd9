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
  """Compiled HLO text split into computations, with how often each runs per step
  (:meth:`runs`).

  A while body runs its loop's trip count times per run of its caller (read from the
  condition, ``i < N``, or the GPU compiler's ``known_trip_count``); of a conditional's
  branches only the costliest runs (as the jaxpr FLOP count takes it: an upper bound);
  any other called computation (fusion, reducer) once per run of its caller.
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
    # caller -> [(callees, times per caller run, alternatives?)]
    self._calls = {name: [] for name in self.computations}
    called = set()
    for name, lines in self.computations.items():
      for line in lines:
        trips = {}
        loop = _WHILE.search(line)
        if loop:
          cond, body = loop.groups()
          trips[body] = self._trip_count(line, cond, lines)
        for one, many in _CALLED.findall(line):
          callees = [c.strip().lstrip('%') for c in (one or many).split(',')]
          callees = [c for c in callees if c in self.computations]
          called.update(callees)
          if many:  # a conditional's branches: one of them runs
            self._calls[name].append((callees, 1, True))
          else:
            self._calls[name] += [([c], trips.get(c, 1), False) for c in callees]
    self._roots = [name for name in self.computations if name not in called]

  def runs(self, own_cost=None) -> dict[str, int]:
    """{computation: executions per step}. ``own_cost(name)``, the cost of a
    computation's own instructions, picks the costliest branch of each conditional
    (with what it calls); without it, the first."""
    own_cost = own_cost or (lambda name: 0)
    totals = {}

    def total(name, seen=()):
      if name not in totals:
        cost = own_cost(name)
        for callees, times, alternatives in self._calls[name]:
          inner = [total(c, seen + (name,)) for c in callees if c not in seen]
          cost += times * (max(inner, default=0) if alternatives else sum(inner))
        totals[name] = cost
      return totals[name]

    counts = {name: 0 for name in self.computations}

    def visit(name, n, seen=()):
      counts[name] += n
      for callees, times, alternatives in self._calls[name]:
        callees = [c for c in callees if c not in seen]
        if alternatives and callees:
          callees = [max(callees, key=lambda c: total(c, seen + (name,)))]
        for callee in callees:
          visit(callee, n * times, seen + (name,))

    for root in self._roots:  # ENTRY (and unreferenced helpers)
      visit(root, 1)
    return counts

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


def _tally(program: Program, items, top: int) -> tuple[dict, list, float]:
  """Per-step totals of the items ``items(computation, lines)`` yields for each
  computation, as (op, bytes per run, shown type, jax op name): ({op: {'ops', 'runs',
  'bytes'}}, the ``top`` biggest as (bytes, op, type, name), total bytes)."""
  found = {name: list(items(name, lines)) for name, lines in program.computations.items()}
  runs = program.runs(lambda name: sum(size for _, size, _, _ in found[name]))
  stats, biggest, total = {}, [], 0.0
  for name, entries in found.items():
    n = runs[name]
    if not n:  # a branch not taken
      continue
    for op, size, shown, op_name in entries:
      entry = stats.setdefault(op, {'ops': 0, 'runs': 0, 'bytes': 0})
      entry['ops'] += 1
      entry['runs'] += n
      entry['bytes'] += n * size
      total += n * size
      biggest.append((n * size, op, shown, op_name))
  return stats, sorted(biggest, reverse=True)[:top], total


def _op_name(text: str) -> str:
  found = _OP_NAME.search(text)
  return found.group(1) if found else ''


def collective_stats(hlo: str | Program) -> tuple[dict, list]:
  """Collectives inside a slice (or on one GPU host), per device per step.

  Returns ({op: {'ops': static count (in computations that run), 'runs': executions,
  'bytes': result bytes moved}},
  the 3 biggest ops by bytes as (bytes, op, result type, jax op name)). An async
  start/done pair counts once. TPU's compiler often writes an FSDP all-gather as an
  all-reduce of a zero-padded buffer (and a reduce-scatter as an all-reduce and a
  slice), so there the bytes say more than the op names. An async collective XLA moved
  into a loop body to overlap it with the loop is counted every iteration: an upper
  bound.
  """
  def items(_, lines):
    for line in lines:
      for type_text, op, start in _OP.findall(line):
        # An async *-start returns (operands, results): its largest array is the result.
        arrays = ['{}[{}]'.format(*a) for a in _ARRAY.findall(type_text)]
        yield (op, array_bytes(type_text, largest=bool(start)),
               arrays[-1] if start else ', '.join(arrays), _op_name(line))

  program = hlo if isinstance(hlo, Program) else Program(hlo)
  stats, biggest, _ = _tally(program, items, 3)
  return {op: stats.get(op, {'ops': 0, 'runs': 0, 'bytes': 0}) for op in COLLECTIVES}, biggest


def dcn_stats(hlo: str | Program) -> tuple[dict, list]:
  """Cross-slice collectives of a multislice TPU program, per device per step: the same
  shape as :func:`collective_stats`, keyed by the collective each transfer implements
  ('all-reduce', 'all-gather', ...), bytes = what each device receives over the DCN.
  Empty for a one-slice program."""
  def items(_, lines):
    for line in lines:
      found = _DCN_RECV.search(line)
      if found:
        type_text, kind = found.groups()
        payload = _ARRAY.search(type_text)  # (data, u32[] context, token[])
        shown = '{}[{}]'.format(*payload.groups()) if payload else '?'
        yield (kind.lower().replace('_', '-'), array_bytes(shown) if payload else 0, shown,
               _op_name(line))

  program = hlo if isinstance(hlo, Program) else Program(hlo)
  stats, biggest, _ = _tally(program, items, 3)
  return stats, biggest


# -- HBM traffic -----------------------------------------------------------------------

_ARRAY_LAYOUT = re.compile(r'\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\](\{[^}]*\})?')
_MEMORY_SPACE = re.compile(r'S\((\d+)\)')
# No data moved (views, bookkeeping), or moved by the ops they start/finish or call
# (counted there), or host transfers over the DCN (dcn_stats).
_FREE = {'parameter', 'constant', 'get-tuple-element', 'tuple', 'bitcast', 'after-all',
         'partition-id', 'replica-id', 'while', 'call', 'conditional', 'copy-done',
         'send', 'recv', 'send-done', 'recv-done', 'all-gather-done', 'all-reduce-done',
         'collective-permute-done', 'async-done', 'async-update', 'opt-barrier',
         'add-dependency'}
_SLICERS = {'dynamic-slice', 'slice', 'gather'}


def hbm_array_bytes(type_text: str) -> int:
  """Bytes of the arrays of an HLO type that live in HBM: TPU layouts mark arrays the
  compiler placed in on-chip memory with a memory space ``S(n)``, n > 0."""
  total = 0
  for dtype, dims, layout in _ARRAY_LAYOUT.findall(type_text):
    space = _MEMORY_SPACE.search(layout or '')
    if space and space.group(1) != '0':
      continue
    total += array_bytes(f'{dtype}[{dims}]')
  return total


def _split_instruction(line: str):
  """(name, type text, opcode, operand names, rest) of an instruction line, or None."""
  head = re.match(r'\s*(?:ROOT\s+)?%?([\w.-]+)\s*=\s*', line)
  if not head:
    return None
  i = head.end()
  if line[i:i + 1] == '(':  # a tuple type: up to its closing parenthesis
    depth = 0
    for j in range(i, len(line)):
      depth += {'(': 1, ')': -1}.get(line[j], 0)
      if depth == 0:
        break
    type_end = j + 1
  else:
    type_end = line.index(' ', i)
  op = re.match(r'\s*([\w-]+)\(', line[type_end:])
  if not op:
    return None
  start = type_end + op.end()
  depth, j = 1, start
  while depth and j < len(line):
    depth += {'(': 1, ')': -1}.get(line[j], 0)
    j += 1
  operands = re.findall(r'%([\w.-]+)', line[start:j - 1])
  return head.group(1), line[i:type_end], op.group(1), operands, line[j:]


class _FusedView:
  """A fused computation seen from its fusion instruction: what the fusion reads of each
  operand (:meth:`reads`) and what it writes (``write_bytes``)."""

  def __init__(self, program: 'Program', name: str, cache: dict):
    self.program, self.cache = program, cache
    self.instructions, self.params, root = {}, {}, None
    for line in program.computations[name]:
      parsed = _split_instruction(line)
      if not parsed:
        continue
      name_, type_text, op, operands, rest = parsed
      self.instructions[name_] = (type_text, op, operands, rest)
      if op == 'parameter':
        self.params[int(re.search(r'parameter\((\d+)\)', line).group(1))] = name_
      if line.lstrip().startswith('ROOT'):
        root = name_
    self.users = {n: [] for n in self.instructions}
    for name_, (_, op, operands, rest) in self.instructions.items():
      for position, operand in enumerate(operands):
        if operand in self.users:
          self.users[operand].append((name_, op, position, rest))
    # What the fusion writes: each output whole, but an output that is a dynamic-update-
    # slice (in place: the scan's [layers, ...] residual stacks) only its update.
    roots = [root] if root else []
    if root and self.instructions[root][1] == 'tuple':
      roots = self.instructions[root][2]
    self.write_bytes = sum(self._written(r) for r in roots) if roots else None

  def _written(self, name: str) -> int:
    type_text, op, operands, _ = self.instructions.get(name, ('', '', [], ''))
    if op == 'bitcast' and operands:
      return self._written(operands[0])
    if op == 'dynamic-update-slice' and len(operands) > 1:
      update = self.instructions.get(operands[1], ('',))[0]
      return array_bytes(update) if hbm_array_bytes(type_text) else 0
    return hbm_array_bytes(type_text)

  @classmethod
  def of(cls, program: 'Program', name: str, cache: dict) -> '_FusedView':
    if name not in cache:
      cache[name] = cls(program, name, cache)
    return cache[name]

  def reads(self, index: int, full: int) -> int:
    """Bytes read of operand ``index`` (``full`` bytes in HBM): only the slices when all
    the fusion does with it is slice it (a scanned layer's weights out of the [layers,
    ...] stack, through nested fusions and bitcasts), nothing when it only updates it in
    place, else all of it."""
    return min(self._reads(self.params.get(index), full), full)

  def _reads(self, value: str | None, full: int) -> int:
    if value is None:
      return full
    total = 0
    for user, op, position, rest in self.users.get(value, []):
      if op in _SLICERS and position == 0:
        total += array_bytes(self.instructions[user][0])
      elif op == 'dynamic-update-slice' and position == 0:
        continue
      elif op == 'bitcast':
        total += self._reads(user, full)
      elif op == 'fusion' and re.search(r'calls=%?([\w.-]+)', rest):
        callee = re.search(r'calls=%?([\w.-]+)', rest).group(1)
        total += _FusedView.of(self.program, callee, self.cache).reads(position, full)
      else:
        return full
    return total


def hbm_bytes(hlo: str | Program) -> tuple[float, list]:
  """Bytes one device moves through HBM in one step: every executed instruction reads its
  operands and writes its result once (a fusion counts its own operands and result, not
  its insides), loop bodies times their trip count, arrays in on-chip memory left out.
  A fusion that only slices an operand (a scanned layer's weights out of the [layers,
  ...] stack) reads the slices, one that updates an operand in place writes the update:
  so a scanned layer's weights count once per layer and use, not as the whole stack.

  Returns (bytes, the 5 biggest instructions as (bytes, opcode, type, jax op name)).
  """
  program = hlo if isinstance(hlo, Program) else Program(hlo)
  inside = set()  # fused computations and reducers: their cost is their caller's
  for _, line in program.lines():
    if re.search(r'\bfusion\(', line) or 'async-start(' in line:
      inside.update(re.findall(r'calls=%?([\w.-]+)', line))
    inside.update(re.findall(r'to_apply=%?([\w.-]+)', line))
  views = {}

  def items(comp, lines):
    if comp in inside:
      return
    types = {}
    for line in lines:
      parsed = _split_instruction(line)
      if not parsed:
        continue
      name, type_text, op, operands, rest = parsed
      types[name] = type_text
      if op in _FREE or op.endswith('-done') or 'custom_call_target="AllocateBuffer"' in rest:
        continue
      out = hbm_array_bytes(type_text)
      ins = [hbm_array_bytes(types.get(o, '')) for o in operands]
      if op == 'copy-start':  # (destination, source, context): one read, one write
        size = sum(ins) + hbm_array_bytes(type_text.split(',')[0])
      elif op in _SLICERS:
        size = 2 * out
      elif op == 'dynamic-update-slice':
        size = 2 * (ins[1] if len(ins) > 1 else out)
      elif op == 'fusion':
        callee = re.search(r'calls=%?([\w.-]+)', rest)
        view = None
        if callee and callee.group(1) in program.computations:
          view = _FusedView.of(program, callee.group(1), views)
        reads = sum(view.reads(i, b) if view else b for i, b in enumerate(ins))
        writes = view.write_bytes if view and view.write_bytes is not None else out
        size = reads + writes
      elif op.endswith('-start'):  # async collective: its type holds (operands, results)
        size = hbm_array_bytes(type_text)
      else:
        size = sum(ins) + out
      if size:
        yield op, size, type_text[:80], _op_name(rest)

  _, biggest, total = _tally(program, items, 5)
  return total, biggest
