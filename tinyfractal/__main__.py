import sys

from tinyfractal.cli import main

sys.exit(main())
