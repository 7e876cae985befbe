import sys

from mscp.cli import main

sys.exit(main())
