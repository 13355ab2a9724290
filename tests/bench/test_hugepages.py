"""`python -m bench.hugepages`: processes on small pages against processes on huge pages, in pairs."""

import json
import platform
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[2]
THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def collapse_available() -> bool:
    """Linux 6.1+ (MADV_COLLAPSE) with transparent huge pages not disabled."""
    m = re.match(r"(\d+)\.(\d+)", platform.release())
    on = THP.exists() and "[never]" not in THP.read_text()
    return sys.platform.startswith("linux") and on and m is not None and (int(m[1]), int(m[2])) >= (6, 1)


def _run(checkpoint: str, corpus: str, tmp_path: Path, mode: str) -> dict[str, Any]:
    out = tmp_path / f"{mode}.json"
    cmd = [sys.executable, "-m", "bench.hugepages", "--checkpoint", checkpoint, "--corpus", corpus, "--mode", mode]
    cmd += ["--rounds", "1", "--prompts", "2", "--new-tokens", "8", "--eager", "--out", str(out)]
    subprocess.run(cmd, cwd=ROOT, check=True, capture_output=True)
    return dict(json.loads(out.read_text()))


@pytest.mark.skipif(not collapse_available(), reason="needs Linux 6.1+ with transparent huge pages")
def test_each_pair_is_two_processes_one_on_huge_pages(byte_checkpoint: tuple[str, str], tmp_path: Path) -> None:
    for mode in ("collapse", "tunable"):
        res = _run(*byte_checkpoint, tmp_path, mode)
        assert res["mode"] == mode and res["steps"] == "eager" and len(res["pairs"]) == 1
        pair = res["pairs"][0]
        small, huge = pair["small"], pair["huge"]
        assert small["tokens_per_s"] > 0 and huge["tokens_per_s"] > 0
        assert (
            pair["ratio"]
            == res["huge_over_small_per_pair"][0]
            == round(huge["tokens_per_s"] / small["tokens_per_s"], 3)
        )
        assert set(small["runs"][0]["tokens_per_s_by_drafts"]) == {"0", "1", "2", "3"}  # drafts 0 .. k - 1
        if "[madvise]" in THP.read_text():  # huge pages only where asked for
            assert small["anon_huge_mib"] < huge["anon_huge_mib"]
        assert (huge["collapse_declined"] is not None) == (mode == "collapse")
