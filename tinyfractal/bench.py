"""`python -m tinyfractal.bench`: the training benchmark, which lives in tinyfractal/tools/bench.py."""
from tinyfractal.tools.bench import main

if __name__ == "__main__":
    raise SystemExit(main())
