"""Time the leakage audit's duplicate search at dataset scale (random hashes, no images).

  python scripts/benchmark_audit.py --n=80000 [--groups=0]

Prints one JSON line: images, seconds, pairs found, peak RSS. `--groups=K` puts the images in K
patient groups whose pairs are counted, not listed (as covidx_ct does for CT volumes).
"""

import argparse
import json
import platform
import resource
import time

import numpy as np

from covid_flax.datasets import audit


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--n", type=int, default=80000)
  parser.add_argument("--groups", type=int, default=0)
  args = parser.parse_args()
  rng = np.random.default_rng(0)
  bits = rng.random((args.n, audit.HASH_SIZE**2)) < 0.5
  groups = rng.integers(0, args.groups, args.n) if args.groups else None
  start = time.perf_counter()
  found, not_listed = audit._hamming_pairs(bits, audit.AHASH_MAX, groups)
  seconds = time.perf_counter() - start
  peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6
  print(json.dumps({
    "measure": "audit_duplicate_search", "images": args.n, "seconds": round(seconds, 1),
    "pairs": len(found), "not_listed": not_listed, "peak_rss_gb": round(peak_gb, 2),
    "cpu": platform.processor() or platform.machine(),
  }))  # fmt: skip


if __name__ == "__main__":
  main()
