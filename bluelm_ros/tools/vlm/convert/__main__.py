"""``python -m bluelm_ros.tools.vlm.convert FAMILY HF_DIR OUT_DIR``."""
import sys

from bluelm_ros.tools.vlm.convert import main

sys.exit(main())
