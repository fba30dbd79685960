"""Import the generated ROS interfaces, or explain which install of bluelm_ros is active.

There are two installs of this package: colcon (interfaces + library) and `pip install .`
(library only). Nodes import interfaces through here so the pip copy, if it wins on
sys.path, fails with a message that says how to fix it instead of a bare ImportError.
"""
import importlib
import os

import bluelm_ros


class InterfacesUnavailable(ImportError):
    """The active bluelm_ros has no generated msg/srv/action modules."""


def load(kind):
    """Return the generated module `bluelm_ros.<kind>` (kind: msg, srv or action)."""
    try:
        return importlib.import_module(f'bluelm_ros.{kind}')
    except ImportError as exc:
        where = os.path.dirname(os.path.abspath(bluelm_ros.__file__))
        raise InterfacesUnavailable(
            f'bluelm_ros.{kind} is missing: the bluelm_ros imported from {where} has no ROS '
            'interfaces (it is the pip/library-only install, or a source checkout on '
            'sys.path). Build the package with colcon and `source install/setup.bash` '
            '(here: `. .ws/env.sh` after scripts/setup.sh), or run nodes from outside the '
            'source folder. See docs/install-paths.md.') from exc
