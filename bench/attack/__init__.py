"""Attack suite: known failure modes, each reproduced against a real `mtp serve` process
(`python -m bench.attack`; its options and what it prints are in suite.py).

lab.py holds what every attack shares (servers, raw-socket and HTTP helpers, Result); door.py,
inputs.py, connections.py and lifecycle.py hold the attacks by group; suite.py the registry
(ATTACKS), the runner and the command.
"""

from bench.attack.suite import main

__all__ = ["main"]
