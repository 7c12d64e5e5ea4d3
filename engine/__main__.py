import sys

from engine._entry import main

sys.exit(main())
