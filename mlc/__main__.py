import sys

from mlc.cli import main

sys.exit(main())
