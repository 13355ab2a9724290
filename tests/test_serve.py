"""app/serve.py: the process-level settings `mtp serve` applies before it loads the model."""

import subprocess
import sys
from pathlib import Path

import pytest

from app.serve import fix_mmap_threshold

ROOT = Path(__file__).resolve().parent.parent

# What a server's forward passes do to the heap: one large batch (its freed activation makes
# glibc's adaptive threshold jump to its size), then smaller ones, each leaving a small tensor
# that outlives its activation (allocated above it). Prints the MB of RSS still held at the end.
WORKLOAD = """
import os, sys, torch
from app.serve import fix_mmap_threshold
assert fix_mmap_threshold(int(sys.argv[1])) == (int(sys.argv[1]) > 0)
def rss_mb():
    return int(open(f"/proc/{os.getpid()}/statm").read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
base = rss_mb()
kept = []
torch.ones(24 * 2**18).sum()  # the 24 MB peak batch, freed at once
for mb in range(1, 21):
    activation = torch.ones(mb * 2**18)  # mb MB
    kept.append(activation[:4].clone())  # a small result that lives on
    del activation
print(rss_mb() - base)
"""


def _retained_mb(threshold: int) -> float:
    out = subprocess.run(
        [sys.executable, "-c", WORKLOAD, str(threshold)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return float(out.stdout.strip().splitlines()[-1])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_pinned_mmap_threshold_returns_freed_activations_to_the_os() -> None:
    assert _retained_mb(0) > 16.0  # glibc's adaptive threshold keeps them (the soak saw +22 % RSS)
    assert _retained_mb(1 << 20) < 8.0


def test_a_zero_threshold_leaves_malloc_alone() -> None:
    assert fix_mmap_threshold(0) is False
