"""`python -m tinyfractal.infer_bench`: the inference benchmark, which lives in tinyfractal/tools/infer_bench.py."""
from tinyfractal.tools.infer_bench import main

if __name__ == "__main__":
    raise SystemExit(main())
