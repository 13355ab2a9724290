"""Where the compiled steps' Inductor cache goes (app/engine/compile.py), in a fresh process each
time: the setting's default reads the environment as the process began."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]

# As in `mtp serve`: app's modules are imported, then Inductor looks its cache up (importing its
# config does it too) and writes its own default into $TORCHINDUCTOR_CACHE_DIR, then the steps
# compile and ask where their cache is.
PROBE = """
import app.engine.compile as compile
import torch._inductor.config
from torch._inductor.runtime.cache_dir_utils import cache_dir as inductor_cache_dir
from app.engine.config import EngineConfig
inductor_cache_dir()
print(compile.cache_dir(EngineConfig()))
print(compile.cache_dir(EngineConfig(compile_cache_dir="/srv/steps")))
"""


def cache_dirs(tmp_path: Path, **env: str) -> list[str]:
    """The default cache directory and the one with the setting, in a new process with `env`."""
    base = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    base.update(XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONPATH=str(REPO_ROOT), **env)
    done = subprocess.run(
        [sys.executable, "-c", PROBE], env=base, capture_output=True, text=True, timeout=300, check=True
    )
    return done.stdout.split()


def inductor_default() -> str:
    from torch._inductor.runtime.cache_dir_utils import default_cache_dir

    return os.path.abspath(default_cache_dir())


def test_the_default_cache_is_the_projects_own_though_inductor_set_its_own(tmp_path: Path) -> None:
    assert cache_dirs(tmp_path) == [str(tmp_path / "xdg" / "mtp" / "inductor"), "/srv/steps"]


def test_a_cache_directory_set_in_the_environment_is_used(tmp_path: Path) -> None:
    chosen = str(tmp_path / "chosen")
    assert cache_dirs(tmp_path, TORCHINDUCTOR_CACHE_DIR=chosen) == [chosen, "/srv/steps"]


def test_inductors_own_default_set_by_the_user_is_used(tmp_path: Path) -> None:
    default = inductor_default()
    assert cache_dirs(tmp_path, TORCHINDUCTOR_CACHE_DIR=default)[0] == default
