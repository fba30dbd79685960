"""``python -m bluelm_ros.tools.vlm.configs [name-or-path ...]``: parameter counts."""
import sys

from bluelm_ros.tools.vlm.configs import main

sys.exit(main())
