import sys

from hpcps.cli import main

sys.exit(main())
