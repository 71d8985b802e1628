import sys

from kvalloc.cli import main

sys.exit(main())
