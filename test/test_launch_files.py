"""The launch files, evaluated with every argument combination (issue 18).

The real `launch`/`launch_ros` are apt-only, so each file runs against `launch_standin`
(the same semantics for the parts used: scopes, conditions, substitutions, includes,
argument discovery) and the test checks what `ros2 launch` would start: which nodes, in
which namespace, with which parameter files (shipped first, the user's second), which
camera topic, output on the screen, and which Fast DDS profile in their environment; and
that nothing the file sets (arguments, the profile variable) is left behind for a parent
launch file. The manual `ros2 launch` check for apt ROS 2 is in docs/launch.md.
"""
import itertools
import os

import pytest

import launch_standin
from bluelm_ros.ros.common import fastdds_profiles_variable

pytest.importorskip('ament_index_python')
from ament_index_python.packages import get_package_share_directory  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SHARE = get_package_share_directory('bluelm_ros')
SHIPPED_PARAMS = os.path.join(SHARE, 'config', 'bluelm_ros.yaml')
SHIPPED_PROFILE = os.path.join(SHARE, 'config', 'fastdds_large_frames.xml')
PROFILE_VAR = fastdds_profiles_variable()  # what the launch file sets on this distro
QOS_VAR = 'RMW_FASTRTPS_USE_QOS_FROM_XML'  # needed by the shipped profile's memory policy
EXECUTABLES = {'camera_source': 'camera_source_node', 'segmentation_node': 'segmentation_node',
               'scene_qa_node': 'scene_qa_node'}
# switch argument -> (node, default)
SWITCHES = {'use_camera_source': ('camera_source', 'false'),
            'use_segmentation': ('segmentation_node', 'true'),
            'use_scene_qa': ('scene_qa_node', 'true')}
# launch file -> switches it turns off whatever the command line says
FILES = {'bluelm_ros.launch.py': (), 'segmentation.launch.py': ('use_scene_qa',),
         'scene_qa.launch.py': ('use_segmentation',)}
ARGUMENTS = {'params_file', 'camera_topic', 'namespace', 'fastdds_profile', *SWITCHES}
USER_PARAMS = os.path.join(SHARE, 'config', 'low_power.yaml')
# Values tried per argument; None: not given (the default applies).
VALUES = {
    **{switch: (None, 'true', 'false') for switch in SWITCHES},
    'namespace': (None, 'robot1'),
    'camera_topic': (None, '/cam/front/image_raw'),
    'params_file': (None, USER_PARAMS),
    'fastdds_profile': (None, '/etc/custom_profile.xml'),
}
PARENT_PROFILE = '/opt/parent/profile.xml'  # a profile the environment already names


def _path(name):
    return os.path.join(ROOT, 'launch', name)


def _environment(parent_profile):
    env = {k: v for k, v in os.environ.items() if k != PROFILE_VAR}
    if parent_profile:
        env[PROFILE_VAR] = parent_profile
    return env


def _resolve(namespace, topic):
    """A topic name as rcl resolves a remap target inside a node namespace."""
    return topic if topic.startswith('/') else namespace.rstrip('/') + '/' + topic


def _expected(name, args, env):
    """What ros2 launch must start for these arguments, worked out from the docs."""
    nodes = {node for switch, (node, default) in SWITCHES.items()
             if args.get(switch, default) == 'true' and switch not in FILES[name]}
    namespace = '/' + args.get('namespace', '')
    return {
        'nodes': nodes,
        'namespace': namespace,
        'camera': _resolve(namespace, args.get('camera_topic', 'camera/image_raw')),
        'parameters': [SHIPPED_PARAMS, args.get('params_file', SHIPPED_PARAMS)],
        'profile': args.get('fastdds_profile', env.get(PROFILE_VAR, SHIPPED_PROFILE)),
    }


def _combinations():
    names = sorted(VALUES)
    for values in itertools.product(*(VALUES[n] for n in names)):
        yield {n: v for n, v in zip(names, values) if v is not None}


def _check(name, args, env):
    """Run one file with these arguments; return a list of what differs from _expected."""
    with launch_standin.installed() as launch:
        context = launch.run(launch.load_launch_file(_path(name)), args, env)
    want = _expected(name, args, env)
    procs = {p.name: p for p in context.processes}
    problems = []
    if set(procs) != want['nodes'] or len(procs) != len(context.processes):
        problems.append(f'started {[p.name for p in context.processes]}, want {want["nodes"]}')
    for p in procs.values():
        got = {'package': p.package, 'executable': p.executable, 'namespace': p.namespace,
               'parameters': p.parameters, 'output': p.output, 'emulate_tty': p.emulate_tty,
               'profile': p.env.get(PROFILE_VAR), 'qos_from_xml': p.env.get(QOS_VAR),
               'camera': _resolve(p.namespace, dict(p.remappings)['image'])}
        exp = {'package': 'bluelm_ros', 'executable': EXECUTABLES[p.name],
               'namespace': want['namespace'], 'parameters': want['parameters'],
               'output': 'screen', 'emulate_tty': True, 'profile': want['profile'],
               'qos_from_xml': '1' if want['profile'] == SHIPPED_PROFILE else env.get(QOS_VAR),
               'camera': want['camera']}
        problems += [f'{p.name}.{k}: {got[k]!r} != {exp[k]!r}' for k in exp if got[k] != exp[k]]
    if 'scene_qa_node' in procs:
        qa = procs['scene_qa_node']
        context_topic = _resolve(qa.namespace, dict(qa.remappings)['scene_context'])
        if context_topic != want['namespace'].rstrip('/') + '/segmentation_node/class_stats':
            problems.append(f'scene_context -> {context_topic}')
    # Scoped: the caller's configurations and environment come back unchanged.
    if context.launch_configurations != args:
        problems.append(f'configurations left behind: {context.launch_configurations}')
    if context.environment != env:
        changed = set(context.environment.items()) ^ set(env.items())
        problems.append(f'environment left behind: {changed}')
    return problems


@pytest.mark.parametrize('name', sorted(FILES))
def test_every_argument_is_declared_optional_and_described(name):
    # What `ros2 launch bluelm_ros <file> --show-args` lists, found the way launch does.
    with launch_standin.installed() as launch:
        declared = launch.launch_arguments(launch.load_launch_file(_path(name)))
    assert {a.name for a, _ in declared} == ARGUMENTS, name
    for argument, conditional in declared:
        assert not conditional, f'{name}: {argument.name} is behind a condition (hidden)'
        assert argument.default_value is not None, f'{name}: {argument.name} has no default'
        assert len(argument.description or '') > 20, f'{name}: {argument.name} undescribed'


@pytest.mark.parametrize('name', sorted(FILES))
def test_every_argument_combination_starts_the_right_nodes(name):
    runs, failures = 0, []
    for args in _combinations():
        for parent_profile in (None, PARENT_PROFILE):
            env = _environment(parent_profile)
            problems = _check(name, args, env)
            runs += 1
            if problems:
                failures.append(f'{args} {PROFILE_VAR}={parent_profile}: {problems}')
    assert runs == 3 ** 3 * 2 ** 4 * 2
    assert not failures, f'{len(failures)} of {runs} combinations:\n' + '\n'.join(failures[:5])


def test_defaults_spelled_out():
    # The common cases by hand (the combination test derives the same from _expected).
    env = _environment(None)
    with launch_standin.installed() as launch:
        main = launch.run(launch.load_launch_file(_path('bluelm_ros.launch.py')), {}, env)
        demo = launch.run(launch.load_launch_file(_path('segmentation.launch.py')),
                          {'namespace': 'robot1', 'use_camera_source': 'true',
                           'params_file': USER_PARAMS}, env)
    assert [(p.name, p.namespace) for p in main.processes] == [
        ('segmentation_node', '/'), ('scene_qa_node', '/')]
    assert dict(main.processes[0].remappings) == {'image': 'camera/image_raw'}
    assert main.processes[0].env[PROFILE_VAR] == SHIPPED_PROFILE
    assert main.processes[0].env[QOS_VAR] == '1'
    assert os.path.isfile(SHIPPED_PROFILE) and os.path.isfile(SHIPPED_PARAMS)
    camera, seg = demo.processes
    assert (camera.name, seg.name) == ('camera_source', 'segmentation_node')
    # The demo camera publishes in the namespace, where the node listens.
    assert _resolve(camera.namespace, dict(camera.remappings)['image']) == \
        _resolve(seg.namespace, dict(seg.remappings)['image']) == '/robot1/camera/image_raw'
    assert seg.parameters == [SHIPPED_PARAMS, USER_PARAMS]  # user file last: its keys win


@pytest.mark.parametrize('name', sorted(FILES))
def test_a_parent_including_the_file_keeps_its_environment_and_configurations(name):
    with launch_standin.installed() as launch:
        def parent(profile):
            actions = [launch.SetLaunchConfiguration('parent_arg', 'x')]
            if profile:
                actions.append(launch.SetEnvironmentVariable(PROFILE_VAR, profile))
            return launch.LaunchDescription([
                *actions,
                launch.IncludeLaunchDescription(
                    launch.PythonLaunchDescriptionSource(_path(name))),
                launch.Node(package='parent_pkg', executable='driver', name='driver')])

        for profile in (None, PARENT_PROFILE):
            context = launch.run(parent(profile), {}, _environment(None))
            *ours, driver = context.processes
            assert driver.name == 'driver' and ours, context.processes
            # The parent's later node sees the parent's profile (or none), not ours ...
            assert driver.env.get(PROFILE_VAR) == profile and QOS_VAR not in driver.env
            # ... ours use the parent's profile when it set one, else the shipped one.
            assert {p.env[PROFILE_VAR] for p in ours} == {profile or SHIPPED_PROFILE}
            # No argument default (or use_* of a single-node file) leaks into the parent.
            assert context.launch_configurations == {'parent_arg': 'x'}


def test_the_stand_in_sees_an_unscoped_file_leak(tmp_path):
    # The pre-issue-18 layout (arguments and profile at the top level) must fail the checks
    # above: the stand-in is not lenient about scopes.
    path = tmp_path / 'unscoped.launch.py'
    path.write_text(
        'from launch import LaunchDescription\n'
        'from launch.actions import DeclareLaunchArgument, SetEnvironmentVariable\n'
        'def generate_launch_description():\n'
        '    return LaunchDescription([DeclareLaunchArgument("namespace", default_value=""),\n'
        f'        SetEnvironmentVariable("{PROFILE_VAR}", "/ours.xml")])\n')
    with launch_standin.installed() as launch:
        context = launch.run(launch.load_launch_file(str(path)), {}, _environment(None))
    assert context.launch_configurations == {'namespace': ''}
    assert context.environment[PROFILE_VAR] == '/ours.xml'
