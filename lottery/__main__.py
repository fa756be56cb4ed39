import sys

from lottery.cli import main

sys.exit(main())
