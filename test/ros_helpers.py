"""Helpers shared by the ROS tests (imported as a plain module from test/): waiting, and
running a real executable that must exit cleanly on Ctrl-C."""
import os
import signal
import subprocess
import sys
import threading
import time

WAIT = 30.0  # seconds to wait for anything that should happen


def wait_until(predicate, timeout=WAIT, interval=0.02):
    """Poll predicate until it is true or timeout passes; return its last value."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())


class Inbox:
    """Subscription callback that keeps every message and lets the test wait on them."""

    def __init__(self):
        self.msgs = []
        self._cond = threading.Condition()

    def __call__(self, msg):
        with self._cond:
            self.msgs.append(msg)
            self._cond.notify_all()

    def wait_for(self, predicate=lambda m: True, timeout=WAIT):
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for msg in self.msgs:
                    if predicate(msg):
                        return msg
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._cond.wait(left)

    def matching(self, predicate):
        with self._cond:
            return [m for m in self.msgs if predicate(m)]


def environment(**changes):
    """This process's environment with changes; a None value removes the variable."""
    env = dict(os.environ)
    for key, value in changes.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


class NodeProcess:
    """A command run as its own process (the real executable), its output in a log file.

    ``with NodeProcess(...) as p:`` stops it if the test left it running (SIGINT, SIGKILL
    after 5 s); ``p.output()`` is everything it printed.
    """

    def __init__(self, args, log_path, cwd, env=None):
        self.log = open(log_path, 'w+')
        self.proc = subprocess.Popen(args, stdout=self.log, stderr=subprocess.STDOUT,
                                     cwd=str(cwd), env=environment(PYTHONUNBUFFERED='1',
                                                                   **(env or {})))

    @classmethod
    def node(cls, module, log_path, cwd, *ros_args, env=None):
        """Run ``module``'s main() with ``--ros-args ros_args`` (as ``ros2 run`` would).

        ``env``: variables set in (None: removed from) this process's environment.
        """
        code = f'from {module} import main; main()'
        return cls([sys.executable, '-c', code, '--ros-args', *ros_args], log_path, cwd, env)

    def rss_mib(self):
        """{'VmRSS', 'RssAnon', 'RssShmem'} of the process in MiB (Linux /proc)."""
        with open(f'/proc/{self.proc.pid}/status') as f:
            return {line.split(':')[0]: int(line.split()[1]) / 1024 for line in f
                    if line.startswith(('VmRSS', 'RssAnon', 'RssShmem'))}

    @classmethod
    def scene_qa(cls, ns, bundle, tmp_path, *params):
        """The scene-QA node executable in namespace /ns on ``bundle``, one ORT thread."""
        return cls.node('bluelm_ros.ros.scene_qa_node', tmp_path / f'{ns}.log', tmp_path,
                        '-r', f'__ns:=/{ns}', '-p', f'bundle_path:={bundle}',
                        '-p', 'threads:=1', *params)

    def rss_mb(self):
        """Resident memory of the process in MB (Linux /proc)."""
        with open(f'/proc/{self.proc.pid}/status') as f:
            for line in f:
                if line.startswith('VmRSS:'):
                    return int(line.split()[1]) / 1024
        raise RuntimeError('no VmRSS')

    def output(self):
        self.log.seek(0)
        return self.log.read()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            # Ctrl-C first: a killed process cannot unlink its Fast DDS /dev/shm segments
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=5.0)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def assert_exited_cleanly(self):
        """Exit code 0, no traceback, no C++ abort (what Ctrl-C must give)."""
        output = self.output()
        assert self.proc.returncode == 0, output
        assert 'Traceback' not in output and 'terminate called' not in output, output
        return output
