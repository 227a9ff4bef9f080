import sys

from parity.cli.parser import main


sys.exit(main())
