"""Launch files, config profiles and the one-process bringup (issue 9).

`launch`/`launch_ros` cannot be installed here, so the launch files are checked another
honest way: parsed (ast) and compiled; every launch API name they import must be a real
one, every keyword they pass must be one the real class takes, every executable they
start must exist in nodes/, be installed by CMakeLists.txt and be in the colcon install,
every launch argument they read must be declared, every file they point to must exist
(in the source tree and in the installed share folder), and their node names and
remappings must be the ones the nodes and `bluelm-ros bringup` use. What they start with
every argument combination is checked in test_launch_files.py.

The config profiles are loaded by the real nodes with `--params-file`: every key must be
a parameter the node declares, with the YAML value arriving unchanged (rclpy refuses a
wrong type, the nodes refuse a wrong choice).

`bluelm-ros bringup` with the shipped config runs both nodes (in-process and as the real
CLI): they publish masks and answer a service call. The shipped config points the scene QA
node at the shipped scene-tiny bundle; until that lands, the copy of the config used here
differs in that one line (bundle_path: a random-weight bundle), and the test with the
unmodified config and the right answers skips, saying so.
"""
import ast
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import cv2
import pytest
import yaml

rclpy = pytest.importorskip('rclpy')

from rclpy.parameter import Parameter  # noqa: E402
from rclpy.qos import HistoryPolicy, QoSProfile, ReliabilityPolicy  # noqa: E402
from sensor_msgs.msg import Image  # noqa: E402

from bluelm_ros.ros import interfaces  # noqa: E402
from bluelm_ros.ros import common  # noqa: E402
from bluelm_ros.ros.bringup import Bringup, default_params_file  # noqa: E402
from bluelm_ros.ros.camera_source_node import CameraSourceNode  # noqa: E402
from bluelm_ros.ros.scene_qa_node import SceneQANode  # noqa: E402
from bluelm_ros.runtime.shipped_models import VLM_BUNDLE  # noqa: E402
from bluelm_ros.ros.segmentation_node import SegmentationNode  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH_DIR = os.path.join(ROOT, 'launch')
CONFIG_DIR = os.path.join(ROOT, 'config')
LAUNCH_FILES = sorted(f for f in os.listdir(LAUNCH_DIR) if f.endswith('.launch.py'))
CONFIG_FILES = sorted(f for f in os.listdir(CONFIG_DIR) if f.endswith('.yaml'))
from ros_helpers import NodeProcess, wait_until  # noqa: E402

WAIT = 60.0
RELIABLE = QoSProfile(history=HistoryPolicy.KEEP_LAST, depth=10,
                      reliability=ReliabilityPolicy.RELIABLE)
SRV = interfaces.load('srv')
SHIPPED_MISSING = ('the shipped VLM bundle bluelm_ros/models/vlm/scene-tiny/ is not installed '
                   'yet (it lands with the trained model; re-run scripts/setup.sh then)')

# Node name (launch files, YAML keys, bringup) -> (node class, executable in nodes/).
NODES = {
    'segmentation_node': (SegmentationNode, 'segmentation_node'),
    'scene_qa_node': (SceneQANode, 'scene_qa_node'),
    'camera_source': (CameraSourceNode, 'camera_source_node'),
}

# The launch API the files may use: module -> names that exist there (ROS 2 Humble+).
LAUNCH_API = {
    'launch': {'LaunchDescription'},
    'launch.actions': {'DeclareLaunchArgument', 'SetEnvironmentVariable', 'GroupAction',
                       'IncludeLaunchDescription', 'LogInfo', 'OpaqueFunction',
                       'ExecuteProcess', 'TimerAction', 'SetLaunchConfiguration'},
    'launch.conditions': {'IfCondition', 'UnlessCondition', 'LaunchConfigurationEquals'},
    'launch.launch_description_sources': {'PythonLaunchDescriptionSource'},
    'launch.substitutions': {'LaunchConfiguration', 'PathJoinSubstitution',
                             'PythonExpression', 'TextSubstitution', 'EnvironmentVariable'},
    'launch_ros.actions': {'Node', 'PushRosNamespace', 'SetRemap', 'SetParameter'},
    'ament_index_python.packages': {'get_package_share_directory', 'get_package_prefix'},
    'os': None, 'os.path': None,
    # our own helper, installed with the launch file; no rclpy at import
    'bluelm_ros.ros.common': {'fastdds_profiles_variable'},
}
# Keywords the real constructors accept (launch_ros Node also takes ExecuteProcess's).
KEYWORDS = {
    'Node': {'package', 'executable', 'name', 'namespace', 'exec_name', 'parameters',
             'remappings', 'ros_arguments', 'arguments', 'condition', 'output',
             'emulate_tty', 'respawn', 'respawn_delay', 'additional_env', 'env', 'cwd',
             'prefix', 'sigterm_timeout', 'sigkill_timeout', 'on_exit'},
    'DeclareLaunchArgument': {'default_value', 'description', 'choices'},
    'SetEnvironmentVariable': {'name', 'value', 'condition'},
    'IfCondition': {'predicate_expression'},
    'IncludeLaunchDescription': {'launch_description_source', 'launch_arguments', 'condition'},
    'GroupAction': {'actions', 'scoped', 'forwarding', 'launch_configurations', 'condition'},
    'LaunchConfiguration': {'variable_name', 'default'},
    'EnvironmentVariable': {'name', 'default_value'},
}


# ------------------------------------------------------------------ launch files (ast)


def _call_name(node):
    f = node.func
    return f.id if isinstance(f, ast.Name) else getattr(f, 'attr', None)


def _literal(node):
    try:
        return ast.literal_eval(node)
    except ValueError:
        return None


def parse_launch(path):
    """Return what a launch file does: imports, calls, nodes, args read/declared, files."""
    with open(path) as f:
        source = f.read()
    tree = ast.parse(source, filename=path)
    compile(source, path, 'exec')
    info = {'imports': [], 'calls': [], 'nodes': [], 'declared': set(), 'read': set(),
            'config_files': [], 'functions': set(), 'includes': []}
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef):
            info['functions'].add(node.name)
        elif isinstance(node, ast.ImportFrom):
            info['imports'] += [(node.module, a.name) for a in node.names]
        elif isinstance(node, ast.Import):
            info['imports'] += [(a.name, None) for a in node.names]
        elif isinstance(node, ast.Call):
            name = _call_name(node)
            kwargs = {k.arg: k.value for k in node.keywords}
            info['calls'].append((name, set(kwargs), node.lineno))
            if name == 'Node':
                remaps = kwargs.get('remappings')
                info['nodes'].append({
                    'package': _literal(kwargs.get('package')),
                    'executable': _literal(kwargs.get('executable')),
                    'name': _literal(kwargs.get('name')),
                    'has_params': 'parameters' in kwargs,
                    'remaps': [_literal(e.elts[0]) for e in getattr(remaps, 'elts', [])],
                    'conditional': 'condition' in kwargs})
            elif name == 'DeclareLaunchArgument' and node.args:
                info['declared'].add(_literal(node.args[0]))
            elif name == 'LaunchConfiguration' and node.args:
                info['read'].add(_literal(node.args[0]))
            elif name == 'join' and len(node.args) == 3 and _literal(node.args[1]) == 'config':
                info['config_files'].append(_literal(node.args[2]))
            elif name == 'join' and len(node.args) == 3 and _literal(node.args[1]) == 'launch':
                info['includes'].append(_literal(node.args[2]))
            elif name == 'IncludeLaunchDescription' and 'launch_arguments' in kwargs:
                args = kwargs['launch_arguments']  # {'name': 'value'}.items()
                keys = getattr(getattr(args, 'func', None), 'value', None)
                info['include_arguments'] = {_literal(k) for k in getattr(keys, 'keys', [])}
    return info


def cmake_installed_programs():
    with open(os.path.join(ROOT, 'CMakeLists.txt')) as f:
        text = f.read()
    programs = set()
    for block in re.findall(r'install\(PROGRAMS(.*?)DESTINATION\s+lib/\$\{PROJECT_NAME\}',
                            text, re.S):
        programs |= {os.path.basename(p) for p in block.split()}
    dirs = re.search(r'install\(DIRECTORY\s+([^)]*?)\s+DESTINATION\s+share/\$\{PROJECT_NAME\}',
                     text)
    return programs, set(dirs.group(1).split()) if dirs else set()


@pytest.mark.parametrize('name', LAUNCH_FILES)
def test_launch_file_is_consistent_with_the_package(name):
    from ament_index_python.packages import get_package_prefix, get_package_share_directory
    info = parse_launch(os.path.join(LAUNCH_DIR, name))
    assert 'generate_launch_description' in info['functions']
    for module, imported in info['imports']:
        assert module in LAUNCH_API, f'{name}: imports {module}'
        if imported is not None and LAUNCH_API[module] is not None:
            assert imported in LAUNCH_API[module], f'{name}: {module}.{imported} is unknown'
    for call, kwargs, line in info['calls']:
        if call in KEYWORDS:
            assert kwargs <= KEYWORDS[call], f'{name}:{line}: {call}({kwargs - KEYWORDS[call]})'
    # Every argument read is declared (a typo would only fail at launch time).
    assert info['read'] <= info['declared'], info['read'] - info['declared']
    programs, share_dirs = cmake_installed_programs()
    assert {'launch', 'config'} <= share_dirs
    prefix = get_package_prefix('bluelm_ros')
    share = get_package_share_directory('bluelm_ros')
    assert os.path.exists(os.path.join(share, 'launch', name)), 'launch file not installed'
    if info['includes']:  # a single-node file: the main file with the other node off
        assert not info['nodes'], f'{name} includes the main file and starts nodes itself'
        assert info['includes'] == ['bluelm_ros.launch.py'], info['includes']
        assert os.path.isfile(os.path.join(share, 'launch', 'bluelm_ros.launch.py'))
        main = parse_launch(os.path.join(LAUNCH_DIR, 'bluelm_ros.launch.py'))
        assert info['include_arguments'] and info['include_arguments'] <= main['declared']
        return
    assert info['nodes'], f'{name} starts no node'
    for n in info['nodes']:
        assert n['package'] == 'bluelm_ros'
        assert n['name'] in NODES, n
        assert n['executable'] == NODES[n['name']][1], n
        exe = os.path.join(ROOT, 'nodes', n['executable'])
        assert os.path.isfile(exe) and os.access(exe, os.X_OK), exe
        assert n['executable'] in programs, f'{n["executable"]} not installed by CMakeLists'
        installed = os.path.join(prefix, 'lib', 'bluelm_ros', n['executable'])
        assert os.access(installed, os.X_OK), f'{installed} missing (scripts/setup.sh)'
        assert n['has_params'], f'{n["name"]} gets no params file'
        assert 'image' in n['remaps'], n
    for f in info['config_files']:
        assert os.path.isfile(os.path.join(CONFIG_DIR, f)), f
        assert os.path.isfile(os.path.join(share, 'config', f)), f'{f} not installed'
    assert 'bluelm_ros.yaml' in info['config_files']


def test_single_node_launch_files_are_the_main_one_with_the_other_node_off():
    # So they take all of its arguments: Fast DDS profile, camera source, namespace.
    for name, off in (('segmentation.launch.py', {'use_scene_qa'}),
                      ('scene_qa.launch.py', {'use_segmentation'})):
        info = parse_launch(os.path.join(LAUNCH_DIR, name))
        assert info['includes'] == ['bluelm_ros.launch.py'] and not info['nodes'], name
        assert info['include_arguments'] == off, name
    main = parse_launch(os.path.join(LAUNCH_DIR, 'bluelm_ros.launch.py'))
    assert {'fastdds_profile', 'use_camera_source'} <= main['declared']


def test_the_bringup_launch_file_and_the_bringup_cli_start_the_same_node_set():
    info = parse_launch(os.path.join(LAUNCH_DIR, 'bluelm_ros.launch.py'))
    nodes = {n['name']: n for n in info['nodes']}
    assert set(nodes) == set(NODES)
    # Per-node enable arguments, camera topic, namespace and params file.
    assert {'use_segmentation', 'use_scene_qa', 'use_camera_source', 'camera_topic',
            'namespace', 'params_file'} <= info['declared']
    assert all(n['conditional'] for n in nodes.values())
    assert nodes['scene_qa_node']['remaps'] == ['image', 'scene_context']
    assert nodes['segmentation_node']['remaps'] == ['image']
    # bringup.py remaps the same names (checked on live nodes in the bringup test below).
    with open(os.path.join(ROOT, 'bluelm_ros', 'ros', 'bringup.py')) as f:
        text = f.read()
    assert "('scene_context', 'segmentation_node/class_stats')" in text
    with open(os.path.join(LAUNCH_DIR, 'bluelm_ros.launch.py')) as f:
        launch_text = f.read()
    assert "('scene_context', 'segmentation_node/class_stats')" in launch_text


# ------------------------------------------------------------------ config profiles


def _load_profile(name):
    with open(os.path.join(CONFIG_DIR, name)) as f:
        data = yaml.safe_load(f)
    out = {}
    for key, body in data.items():
        m = re.fullmatch(r'/\*\*/(\w+)', key)
        assert m, f'{name}: key {key!r} is not /**/<node name>'
        assert set(body) == {'ros__parameters'}, f'{name}: {key}'
        out[m.group(1)] = body['ros__parameters']
    return out


def _make_node(name, params_file, **overrides):
    cls = NODES[name][0]
    args = ['--ros-args', '--params-file', params_file]
    return cls(name, namespace='/config_check', cli_args=args,
               parameter_overrides=[Parameter(k, value=v) for k, v in overrides.items()])


@pytest.mark.parametrize('profile', CONFIG_FILES)
def test_config_profile_parameters_are_declared_by_the_nodes(ros_context, profile):
    path = os.path.join(CONFIG_DIR, profile)
    for name, params in _load_profile(path).items():
        assert name in NODES, f'{profile}: no node called {name}'
        # autostart off: only the parameters are checked here, not the models they name.
        overrides = ({'cache_frames': 1} if name == 'camera_source'
                     else {'autostart': False})
        node = _make_node(name, path, **overrides)
        try:
            for key, value in params.items():
                assert node.has_parameter(key), f'{profile}: {name} has no parameter {key!r}'
                if key in overrides:
                    continue
                got = node.get_parameter(key).value
                assert got == value or list(got) == value, (profile, name, key, got, value)
        finally:
            node.destroy_node()


def test_default_params_file_is_the_installed_shipped_config():
    path = default_params_file()
    assert path and os.path.isfile(path)
    with open(path) as a, open(os.path.join(CONFIG_DIR, 'bluelm_ros.yaml')) as b:
        assert a.read() == b.read(), 'installed config differs: run scripts/setup.sh'


# ------------------------------------------------------------------ bringup


def _config_for_tests(tmp_path, bundle):
    """The shipped config, with bundle_path pointing at `bundle` when it is not shipped."""
    path = default_params_file()
    if VLM_BUNDLE.available():
        return path
    text = open(path).read()
    new, n = re.subn(r'(bundle_path:\s*)""', rf'\g<1>"{bundle}"', text)
    assert n == 1, 'config/bluelm_ros.yaml has no bundle_path line'
    out = tmp_path / 'bluelm_ros.yaml'
    out.write_text(new)
    return str(out)


class Probe:
    """Mask subscriber + AskScene client for one namespace, on its own executor."""

    def __init__(self, spin, ns):
        self.node = rclpy.create_node('bringup_probe', namespace=ns)
        self.masks = []
        self._lock = threading.Lock()
        self.node.create_subscription(Image, 'segmentation_node/mask', self._on_mask,
                                      RELIABLE)
        self.client = self.node.create_client(SRV.AskScene, 'scene_qa_node/ask')
        self.spinner = spin(self.node)

    def _on_mask(self, msg):
        with self._lock:
            self.masks.append(msg)

    def ask(self, question, timeout=WAIT):
        assert self.client.wait_for_service(timeout_sec=timeout), 'no scene QA service'
        future = self.client.call_async(SRV.AskScene.Request(question=question))
        assert wait_until(future.done, timeout), f'no answer to {question!r}'
        return future.result()

    def ask_until_frame(self, question):
        """Ask until the node has a camera frame (no_image before the first one)."""
        deadline = time.monotonic() + WAIT
        while True:
            res = self.ask(question)
            if res.error_code != 'no_image' or time.monotonic() > deadline:
                return res
            time.sleep(0.2)

    def close(self):
        self.spinner.stop()
        self.node.destroy_node()


def test_bringup_with_the_shipped_config_segments_and_answers(spin, tiny_vlm_bundle,
                                                              tmp_path):
    ns = '/bringup_inproc'
    params = _config_for_tests(tmp_path, tiny_vlm_bundle)
    shipped = _load_profile(params)
    # Scene context on, to see the class_stats -> scene_context remap carry data.
    bringup = Bringup(params=params, namespace=ns, camera_topic='camera/image_raw',
                      camera_source='synthetic', extra_params={
                          'scene_qa_node': [Parameter('use_scene_context', value=True)]})
    probe = None
    try:
        assert set(bringup.nodes) == set(NODES)
        seg, qa, cam = (bringup.nodes[k] for k in ('segmentation_node', 'scene_qa_node',
                                                   'camera_source'))
        assert seg.get_fully_qualified_name() == f'{ns}/segmentation_node'
        assert common.lifecycle_state(seg) == 'active', seg.configure_error
        assert common.lifecycle_state(qa) == 'active', qa.configure_error
        # The YAML reached every node; the camera remap reached both subscribers.
        for name, node in bringup.nodes.items():
            for key, value in shipped[name].items():
                if not (name == 'scene_qa_node' and key == 'use_scene_context'):
                    got = node.get_parameter(key).value
                    assert got == value or list(got) == value, (name, key, got)
        assert seg.input_topic == qa.input_topic == f'{ns}/camera/image_raw'
        assert cam.pub.topic_name == f'{ns}/camera/image_raw'
        bringup.start()
        probe = Probe(spin, ns)
        assert wait_until(lambda: len(probe.masks) >= 2, WAIT), 'no masks'
        mask = probe.masks[-1]
        assert (mask.height, mask.width, mask.encoding) == (
            shipped['camera_source']['height'], shipped['camera_source']['width'], 'mono8')
        assert mask.header.frame_id == 'camera'
        res = probe.ask_until_frame('What is in the picture?')
        assert res.success, (res.error_code, res.error_message)
        assert res.answer and res.image_header.frame_id == 'camera'
        assert res.image_header.stamp.sec > 0
        assert wait_until(lambda: 'The segmentation sees: ' in qa.scene_context, WAIT), \
            'no class_stats arrived on the remapped scene_context topic'
        assert qa.executor_threads == shipped['scene_qa_node']['queue_size'] + 4
    finally:
        if probe is not None:
            probe.close()
        bringup.stop()


def _cli(*args):
    exe = shutil.which('bluelm-ros')
    return ([exe] if exe else [sys.executable, '-m', 'bluelm_ros.cli']) + list(args)


def test_bringup_cli_with_the_shipped_config_and_ctrl_c(spin, tiny_vlm_bundle, tmp_path):
    ns = '/bringup_cli'
    params = _config_for_tests(tmp_path, tiny_vlm_bundle)
    args = _cli('bringup', '--params', params, '--namespace', ns, '--camera-source',
                'synthetic')
    with NodeProcess(args, tmp_path / 'bringup.log', tmp_path) as bringup:
        probe = Probe(spin, ns)
        try:
            res = probe.ask_until_frame('What do you see?')
            assert res.success, (res.error_code, res.error_message, bringup.output())
            assert res.image_header.frame_id == 'camera'
            assert wait_until(lambda: len(probe.masks) >= 1, WAIT), 'no masks'
            bringup.proc.send_signal(signal.SIGINT)
            bringup.proc.wait(timeout=WAIT)
        finally:
            probe.close()
    output = bringup.assert_exited_cleanly()
    assert 'camera_source, segmentation_node, scene_qa_node running' in output, output


def test_bringup_cli_bad_params_exit_with_the_reason(tmp_path):
    missing = subprocess.run(_cli('bringup', '--params', str(tmp_path / 'nope.yaml')),
                             capture_output=True, text=True, timeout=120)
    assert missing.returncode == 2
    assert 'parameters file not found' in missing.stderr and 'nope.yaml' in missing.stderr
    bad = tmp_path / 'bad.yaml'
    bad.write_text('/**/segmentation_node:\n  ros__parameters:\n    input_type: h264\n')
    proc = subprocess.run(_cli('bringup', '--params', str(bad), '--namespace', '/bad_yaml',
                               '--no-scene-qa', '--duration', '1'),
                          capture_output=True, text=True, timeout=120, cwd=str(tmp_path))
    output = proc.stdout + proc.stderr
    assert proc.returncode == 1, output
    assert "input_type must be one of 'raw', 'compressed'; got 'h264'" in output
    assert 'Traceback' not in output, output


def test_bringup_with_the_shipped_models_answers_right(spin, tmp_path):
    """The unmodified shipped config and models on a scene with known answers."""
    if not VLM_BUNDLE.available():
        pytest.skip(SHIPPED_MISSING)
    from bluelm_ros.runtime.vlm.engine import VLMEngine
    from bluelm_ros.data.scene_qa import is_correct, SceneQAGenerator
    scene, qas = SceneQAGenerator().scene_questions(5)
    engine = VLMEngine(VLM_BUNDLE.default_path, threads=1)
    known = [(q, a) for _, q, a in qas
             if is_correct(engine.generate(q, image=scene.image, max_new_tokens=32).text, a)]
    engine.close()
    assert known, 'the shipped model gets no question about scene 5 right when asked directly'
    frames = tmp_path / 'frames'
    frames.mkdir()
    cv2.imwrite(str(frames / 'scene.png'), scene.image[:, :, ::-1])
    ns = '/bringup_shipped'
    bringup = Bringup(params=default_params_file(), namespace=ns,
                      camera_topic='camera/image_raw', camera_source=str(frames)).start()
    probe = Probe(spin, ns)
    try:
        assert wait_until(lambda: len(probe.masks) >= 1, WAIT), 'no masks'
        for question, expected in known:
            res = probe.ask_until_frame(question)
            assert res.success and is_correct(res.answer, expected), (question, res.answer,
                                                                      expected)
    finally:
        probe.close()
        bringup.stop()
