"""Benchmarks and reliability suites: `mtp bench NAME` and `python -m bench.NAME`.

Not part of the runtime package (nor of the image): they need the repository checkout and
the `[bench]` extra (pip install -e '.[bench]'). They import `app`; nothing in `app` imports
them except the `mtp bench` command, lazily.
"""
