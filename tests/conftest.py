"""Test-wide set-up: CPU only, 8 fake devices (set before jax is imported anywhere), and
a persistent compilation cache so the many runs of the same tiny programs (trainer
tests, subprocesses) compile once.

XLA's CPU backend compiles at LLVM -O0 here (``TEST_XLA_FLAGS``). The suite's programs are
tiny, so compiling them is most of its CPU time and running them almost none: -O0 halves
the compile of the sharded tiny train step (15 -> 7.6 CPU-s) and takes test_sharding.py
from 150 to 100 CPU-s. The level sets how hard LLVM optimises the machine code XLA emits
for this CPU (the TPU AOT compiles of test_compile_check pass unchanged under it).
Subprocesses that set their own device count keep the other flags (test_train.xla_flags,
launch/local.py), so they compile the same way: trainer tests compare their losses bit
for bit with in-process runs."""

import os
from pathlib import Path

TEST_XLA_FLAGS = '--xla_backend_optimization_level=0'

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_FLAGS', f'--xla_force_host_platform_device_count=8 {TEST_XLA_FLAGS}')
os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')
os.environ.setdefault('TOKENIZERS_PARALLELISM', 'false')
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      str(Path(__file__).resolve().parents[1] / '.pytest_cache' / 'jax_cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')


def pytest_terminal_summary(terminalreporter):
  """Figures a test measured (``record_property('figure', text)``), printed at the end of
  the run: under xdist a worker's own prints never reach the terminal."""
  lines = [f'{r.nodeid}: {text}' for r in terminalreporter.stats.get('passed', [])
           for key, text in getattr(r, 'user_properties', ()) if key == 'figure']
  if lines:
    terminalreporter.section('figures measured by the tests')
    for line in lines:
      terminalreporter.write_line(line)
