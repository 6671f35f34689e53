import sys

from medstylegan2.cli import main

sys.exit(main())
