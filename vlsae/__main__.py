import sys

from vlsae.cli import main

sys.exit(main())
