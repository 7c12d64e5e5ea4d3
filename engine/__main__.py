import sys

from engine._cli import main

sys.exit(main())
