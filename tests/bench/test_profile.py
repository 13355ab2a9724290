"""`python -m bench.profile`: a py-spy profile's shares by function."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from bench.profile import SELF, frame_name, main, summarize

# py-spy's raw format: frames outermost first, `;`-separated, then the stack's sample count
MAIN = "_run_module_as_main (<frozen runpy>:198);serve (app/serve.py:557)"
ROUTE = "handle (/x/site-packages/fastapi/routing.py:10)"
RAW = (
    f"{MAIN};{ROUTE};predict (app/api/routes/predict.py:5) 6\n"
    f"{MAIN};handle (/x/site-packages/fastapi/routing.py:12) 2\n"
    f"{MAIN};{ROUTE};{ROUTE} 2\n"
    "Thread._bootstrap (threading.py:1002);step (app/engine/core.py:80);forward (app/model/model.py:40) 10\n"
    "\n"
    " 3\n"  # samples with no Python frame: counted, in no function
)


def test_a_function_counts_each_sample_it_is_on_the_stack_of_once() -> None:
    p = summarize(RAW.splitlines())
    assert (p.total, p.selected) == (23, 23)
    assert p.inclusive["serve (app/serve.py)"] == 10
    assert p.inclusive["handle (fastapi/routing.py)"] == 10  # lines 10 and 12 are one function; recursion once
    assert p.inclusive["predict (app/api/routes/predict.py)"] == 6
    assert p.inclusive["forward (app/model/model.py)"] == 10


def test_filters_select_a_thread_and_a_path_and_under_splits_by_callee() -> None:
    main_thread = summarize(RAW.splitlines(), first_frame="_run_module_as_main", under="handle")
    assert (main_thread.total, main_thread.selected) == (23, 10)
    assert "forward (app/model/model.py)" not in main_thread.inclusive
    # handle's samples: 6 in predict, 2 in itself, 2 in its recursive call (the outer call's next frame)
    assert main_thread.under == 10
    assert main_thread.children == {"predict (app/api/routes/predict.py)": 6, SELF: 2, "handle (fastapi/routing.py)": 2}
    through = summarize(RAW.splitlines(), contains="predict")
    assert through.selected == 6


def test_the_command_prints_shares_of_the_selected_samples(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    raw = tmp_path / "p.raw"
    raw.write_text(RAW)
    main([str(raw), "--first-frame", "_run_module_as_main", "--under", "serve", "--top", "4"])
    out = capsys.readouterr().out
    assert out.startswith("samples: 23, selected: 10\n")
    assert " 60.0 %  predict (app/api/routes/predict.py)" in out
    assert "under serve: 100.0 % of the selected samples" in out


def test_a_line_that_is_not_raw_output_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="not a line of py-spy's raw output"):
        summarize(["a collapsed stack without its count"])
    assert frame_name("<module>") == "<module>"


SPIN = """
import time
def spin_here():  # for 2 s of CPU time, however little of a core a busy host lends it
    t = time.thread_time()
    while time.thread_time() - t < 2:
        pass
spin_here()
"""


def test_a_real_py_spy_profile_shows_the_function_that_ran(tmp_path: Path) -> None:
    spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if not Path(spy).exists():
        pytest.skip("py-spy is not installed")
    raw = tmp_path / "spin.raw"
    run = subprocess.run(
        [spy, "record", "-r", "100", "-f", "raw", "-o", str(raw), "--", sys.executable, "-c", SPIN],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if run.returncode != 0 or not raw.exists():
        pytest.skip(f"py-spy cannot sample here: {run.stderr.strip()[-200:]}")
    p = summarize(raw.read_text().splitlines())
    spin = next(n for name, n in p.inclusive.items() if name.startswith("spin_here "))
    assert p.selected > 50 and spin / p.selected > 0.9
