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
from typing import NamedTuple

COLLECTIVES = ('all-gather', 'reduce-scatter', 'all-reduce', 'all-to-all', 'collective-permute')
_OP = re.compile(r'=\s*(\([^=]*?\)|\S+)\s+(' + '|'.join(COLLECTIVES) + r')(-start)?\(')
_HEADER = re.compile(r'^(?:ENTRY\s+)?%?([\w.-]+)\s.*\{\s*$')
_WHILE = re.compile(r'\bwhile\(.*\bcondition=%?([\w.-]+), body=%?([\w.-]+)')
_CALLED = re.compile(r'(?:calls|to_apply|body|condition)=%?([\w.-]+)|branch_computations=\{([^}]*)\}')
_ARRAY = re.compile(r'\b(pred|[a-z]+\d+[a-z0-9]*)\[([\d,]*)\]')
_OP_NAME = re.compile(r'op_name="([^"]*)"')
_KNOWN_TRIPS = re.compile(r'"known_trip_count":\{"n":"(\d+)"')
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


class Instruction(NamedTuple):
  name: str
  type: str           # the result type, e.g. 'f32[8,128]{1,0}' or a tuple '(...)'
  op: str             # opcode
  operands: list      # operand instruction names
  inside: str         # the text inside the opcode's parentheses (a constant's value)
  rest: str           # attributes after them (calls=, metadata, ...)


def parse_instruction(line: str) -> Instruction | None:
  """One HLO instruction line, or None for anything else."""
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
  inside = line[start:j - 1]
  return Instruction(head.group(1), line[i:type_end], op.group(1),
                     re.findall(r'%([\w.-]+)', inside), inside, line[j:])


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
    self._parsed: dict[str, dict] = {}
    # caller -> [(callees, times per caller run, alternatives?)]
    self._calls = {name: [] for name in self.computations}
    called = set()
    for name, lines in self.computations.items():
      for line in lines:
        trips = {}
        loop = _WHILE.search(line)
        if loop:
          cond, body = loop.groups()
          trips[body] = self._trip_count(line, cond, name)
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

  def instructions(self, name: str) -> dict[str, Instruction]:
    """{instruction name: Instruction} of computation ``name``, in order."""
    if name not in self._parsed:
      parsed = (parse_instruction(l) for l in self.computations.get(name, []))
      self._parsed[name] = {i.name: i for i in parsed if i}
    return self._parsed[name]

  def _trip_count(self, line: str, cond: str, caller: str) -> int:
    """``limit - start`` of a ``counter < limit`` loop; ``start`` read from the loop's
    initial tuple (XLA peels the first iteration of a pipelined loop out of it, starting
    the counter at 1); 1 when the loop has no such form."""
    known = _KNOWN_TRIPS.search(line)
    if known:
      return int(known.group(1))
    defs = self.instructions(cond)
    for compare in defs.values():
      if compare.op != 'compare' or 'direction=LT' not in compare.rest:
        continue
      counter, limit = (defs.get(o) for o in compare.operands[:2])
      limit = _constant(defs, limit)
      if limit is None or counter is None or counter.op != 'get-tuple-element':
        continue
      index = re.search(r'index=(\d+)', counter.rest)
      start = self._initial(line, int(index.group(1)), caller) if index else None
      return max(limit - (start or 0), 0)
    return 1

  def _initial(self, while_line: str, index: int, caller: str) -> int | None:
    """The constant a while loop's tuple element ``index`` starts at, if it is one."""
    init = re.search(r'\bwhile\(%?([\w.-]+)\)', while_line)
    defs = self.instructions(caller)
    tuple_ = defs.get(init.group(1)) if init else None
    if tuple_ is None or tuple_.op != 'tuple' or index >= len(tuple_.operands):
      return None
    return _constant(defs, defs.get(tuple_.operands[index]))

  def lines(self):
    """(computation name, line) for every instruction line."""
    for name, lines in self.computations.items():
      for line in lines:
        yield name, line


def _constant(defs: dict, instruction: Instruction | None, depth: int = 4) -> int | None:
  """The integer value of an instruction, following copies to a scalar constant."""
  if instruction is None:
    return None
  if instruction.op == 'constant':
    return int(instruction.inside) if re.fullmatch(r'-?\d+', instruction.inside) else None
  if instruction.op == 'copy' and instruction.operands and depth:
    return _constant(defs, defs.get(instruction.operands[0]), depth - 1)
  return None


def tally(program: Program, items, top: int) -> tuple[dict, list, float]:
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


def op_name(text: str) -> str:
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
               arrays[-1] if start else ', '.join(arrays), op_name(line))

  program = hlo if isinstance(hlo, Program) else Program(hlo)
  stats, biggest, _ = tally(program, items, 3)
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
               op_name(line))

  program = hlo if isinstance(hlo, Program) else Program(hlo)
  stats, biggest, _ = tally(program, items, 3)
  return stats, biggest
