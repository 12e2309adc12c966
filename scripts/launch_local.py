"""Starts N training processes on 127.0.0.1 (multi-controller JAX, gloo collectives on CPU).

  python scripts/launch_local.py N --config=configs/synthetic.py --workdir=runs/multi [flags...]

Each process gets `--config.coordinator_address=127.0.0.1:PORT --config.num_processes=N
--config.process_id=i` added to the given flags. Set XLA_FLAGS=--xla_force_host_platform_device_count=K
to give each process K CPU devices. Output of process i goes to WORKDIR/process_i.log; exits with the
first non-zero status (and stops the others), or 0.
"""

import os
import socket
import subprocess
import sys
import time


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def start(n: int, flags: list[str], log_dir: str | None = None) -> list[subprocess.Popen]:
  """Starts process 0..n-1 of one run; their output goes to log_dir/process_i.log (or nowhere)."""
  port = free_port()
  procs = []
  for i in range(n):
    cmd = [sys.executable, "-m", "covid_flax.main", *flags,
           f"--config.coordinator_address=127.0.0.1:{port}", f"--config.num_processes={n}",
           f"--config.process_id={i}"]  # fmt: skip
    out = open(os.path.join(log_dir, f"process_{i}.log"), "w") if log_dir else subprocess.DEVNULL
    procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT))
  return procs


def launch(n: int, flags: list[str], timeout_s: float | None = None) -> int:
  """Runs the n processes to the end; the first non-zero exit status stops the others."""
  workdir = next((f.split("=", 1)[1] for f in flags if f.startswith("--workdir=")), None)
  if workdir is None:
    sys.exit("error: pass --workdir=DIR")
  os.makedirs(workdir, exist_ok=True)
  procs = start(n, flags, workdir)
  deadline = None if timeout_s is None else time.time() + timeout_s
  while True:
    codes = [p.poll() for p in procs]
    failed = [c for c in codes if c not in (None, 0)]
    if failed or all(c == 0 for c in codes) or (deadline and time.time() > deadline):
      break
    time.sleep(0.2)
  for p in procs:
    if p.poll() is None:
      p.terminate()
  for p in procs:
    p.wait()
  return failed[0] if failed else (0 if all(c == 0 for c in codes) else 124)


if __name__ == "__main__":
  if len(sys.argv) < 2 or not sys.argv[1].isdigit():
    sys.exit(__doc__)
  sys.exit(launch(int(sys.argv[1]), sys.argv[2:]))
