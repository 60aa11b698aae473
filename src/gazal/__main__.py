import sys

from gazal.cli import main

sys.exit(main())
