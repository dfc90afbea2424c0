"""`python -m tinyfractal.study`: research commands (the nesting tax), which live in tinyfractal/tools/study.py."""
from tinyfractal.tools.study import main

if __name__ == "__main__":
    raise SystemExit(main())
