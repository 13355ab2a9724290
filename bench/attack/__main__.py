"""`python -m bench.attack`: the attack suite's command (suite.main)."""

from bench.attack.suite import main

if __name__ == "__main__":
    main()
