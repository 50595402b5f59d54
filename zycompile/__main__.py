import sys

from zycompile.cli import main

sys.exit(main())
