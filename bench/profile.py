"""Where a py-spy profile's time goes: each function's share of the samples that pass through it.

    py-spy record -r 50 -f raw -o startup.raw -- mtp serve     # Ctrl-C once /ready answers 200
    python -m bench.profile startup.raw [--first-frame _run_module_as_main] [--contains FUNC]
        [--under FUNC] [--top 40]

py-spy's raw output holds one line per distinct stack, its frames outermost first, then how many
samples it got. A function's share is the samples whose stack holds it at least once (recursion
counted once), over the samples selected: every one, or those whose outermost frame is
--first-frame (a thread's entry: `_run_module_as_main` is the main thread, where `mtp serve`'s
event loop runs; `Thread._bootstrap` the others) and whose stack holds --contains. --under FUNC
prints, for the samples in FUNC, what FUNC called (its next frame), so that a share can be
split one level at a time. A frame is `function (file)`, the line dropped and the path cut
after site-packages/, so that each function is one name.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

SELF = "<self>"  # the samples whose innermost frame is the function itself


def frame_name(frame: str) -> str:
    """`func (path/to/file.py:123)` as `func (file path after site-packages/)`."""
    name, sep, where = frame.partition(" (")
    if not sep:
        return frame
    path = where.rstrip(")").rsplit(":", 1)[0]
    return f"{name} ({path.split('site-packages/')[-1]})"


def stacks(lines: Iterable[str]) -> Iterator[tuple[list[str], int]]:
    """(frames outermost first, samples) per line of py-spy's raw output; blank lines skipped.
    A sample taken with no Python frame on the stack (a process starting or leaving) is a line
    with a count only: it has no frames."""
    for line in lines:
        line = line.rstrip("\n")
        if not line.strip():
            continue
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():
            raise ValueError(f"not a line of py-spy's raw output: {line[:120]!r}")
        yield ([frame_name(f) for f in stack.split(";")] if stack.strip() else []), int(count)


def _matches(frame: str, name: str) -> bool:
    return frame == name or frame.split(" (", 1)[0] == name


@dataclass
class Profile:
    total: int = 0  # every sample read
    selected: int = 0  # those that passed the filters
    inclusive: Counter[str] = field(default_factory=Counter)
    children: Counter[str] = field(default_factory=Counter)  # --under's callees
    under: int = 0  # selected samples in --under's function


def summarize(
    lines: Iterable[str], first_frame: str | None = None, contains: str | None = None, under: str | None = None
) -> Profile:
    """The shares of a raw profile. A name given without its file matches any file."""
    p = Profile()
    for frames, n in stacks(lines):
        p.total += n
        if first_frame is not None and not (frames and _matches(frames[0], first_frame)):
            continue
        if contains is not None and not any(_matches(f, contains) for f in frames):
            continue
        p.selected += n
        for f in set(frames):
            p.inclusive[f] += n
        if under is not None:
            at = next((i for i, f in enumerate(frames) if _matches(f, under)), None)
            if at is not None:
                p.under += n
                p.children[frames[at + 1] if at + 1 < len(frames) else SELF] += n
    return p


def report(p: Profile, top: int, under: str | None) -> str:
    def pct(n: int) -> str:
        return f"{100 * n / p.selected:5.1f} %" if p.selected else "    - %"

    out = [f"samples: {p.total}, selected: {p.selected}"]
    out += [f"{pct(n)}  {name}" for name, n in p.inclusive.most_common(top)]
    if under is not None:
        out.append(f"\nunder {under}: {pct(p.under).strip()} of the selected samples")
        out += [f"{pct(n)}  {name}" for name, n in p.children.most_common(top)]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("raw", help="py-spy record -f raw output")
    ap.add_argument("--first-frame", help="only stacks whose outermost frame is this function (a thread's entry)")
    ap.add_argument("--contains", help="only stacks that pass through this function")
    ap.add_argument("--under", help="also split this function's samples by the function it called")
    ap.add_argument("--top", type=int, default=40, help="functions listed (default 40)")
    a = ap.parse_args(argv)
    with open(a.raw, encoding="utf-8") as f:
        p = summarize(f, a.first_frame, a.contains, a.under)
    print(report(p, a.top, a.under))


if __name__ == "__main__":
    main()
