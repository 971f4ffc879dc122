"""``python -m oms_ext.train``: see :mod:`oms_ext.train.cli`."""

import sys

from oms_ext.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
