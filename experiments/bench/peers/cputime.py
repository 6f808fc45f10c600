"""CPU seconds (user + system) of this process and all its descendants, from /proc (stdlib only,
so every peer's virtual environment can use it)."""
from __future__ import annotations

import os


def _stat(pid: str) -> tuple[int, float] | None:
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
  except OSError:
    return None
  # fields[1] = ppid, fields[11] = utime, fields[12] = stime (clock ticks).
  return int(fields[1]), (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tree_cpu_seconds(root: int | None = None) -> float:
  """CPU time of `root` (default: this process) and its living descendants."""
  root = os.getpid() if root is None else root
  table = {}
  for pid in os.listdir("/proc"):
    if pid.isdigit():
      st = _stat(pid)
      if st is not None:
        table[int(pid)] = st
  total, frontier = 0.0, [root]
  seen = set()
  while frontier:
    pid = frontier.pop()
    if pid in seen or pid not in table:
      continue
    seen.add(pid)
    total += table[pid][1]
    frontier.extend(p for p, (ppid, _) in table.items() if ppid == pid)
  return total


def report(examples: int, wall: float, cpu: float, **extra) -> dict:
  """The line every runner prints: examples/s in total and per busy core (examples per CPU
  second of the whole process tree)."""
  return dict(extra, examples=examples, seconds=round(wall, 3),
              examples_per_s=round(examples / wall, 1),
              busy_cores=round(cpu / wall, 2),
              examples_per_s_per_busy_core=round(examples / cpu, 1) if cpu > 0 else None,
              loadavg=open("/proc/loadavg").read().split()[:3])
