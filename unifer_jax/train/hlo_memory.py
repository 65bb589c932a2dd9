"""Bytes one device moves through HBM in a train step, read from the compiled HLO.

Each executed instruction (a fusion as one, a Pallas kernel's custom call as one) reads
its operands and writes its result once; loop bodies count their trip count times and a conditional its costliest branch
(:class:`hlo_stats.Program`); arrays the TPU compiler placed in on-chip memory (memory
space ``S(n)``, n > 0, in their layout) cost nothing. Two things a naive count gets
wrong are handled: a fusion that only slices an operand (a scanned layer's weights or
residuals out of a ``[layers, ...]`` stack) reads the slice, and one that updates an
operand in place (a residual stack) writes the update -- so a scanned layer counts once
per layer, not as the whole stack per layer. The roofline of ``unifer compile-check``
uses it; tests/test_compile_check.py checks it on compiled scans against hand counts.
"""

from __future__ import annotations

import re

from unifer_jax.train.hlo_stats import Program, array_bytes, op_name, parse_instruction, tally

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


class _FusedView:
  """A fused computation seen from its fusion instruction: what the fusion reads of each
  operand (:meth:`reads`) and what it writes (``write_bytes``)."""

  def __init__(self, program: 'Program', name: str, cache: dict):
    self.program, self.cache = program, cache
    self.instructions, self.params, root = {}, {}, None
    for line in program.computations[name]:
      parsed = parse_instruction(line)
      if not parsed:
        continue
      name_, type_text, op, operands, inside, rest = parsed
      self.instructions[name_] = (type_text, op, operands, rest)
      if op == 'parameter':
        self.params[int(inside)] = name_
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
  """(HBM bytes per device per step, the 5 biggest instructions as (bytes, opcode,
  result type, jax op name)) of compiled HLO text (see the module docstring)."""
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
      parsed = parse_instruction(line)
      if not parsed:
        continue
      name, type_text, op, operands, _, rest = parsed
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
        yield op, size, type_text[:80], op_name(rest)

  _, biggest, total = tally(program, items, 5)
  return total, biggest
