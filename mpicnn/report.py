"""``python -m mpicnn.report``: plots and tables from metrics files (see ``mpicnn.observe``)."""
import sys

from mpicnn.observe.report import main

if __name__ == "__main__":
    sys.exit(main())
