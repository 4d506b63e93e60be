"""Allow ``python -m minidit`` as a synonym of the ``minidit`` command."""

import sys

from minidit.cli import main

sys.exit(main())
