"""A stand-in for the part of ROS 2 `launch` / `launch_ros` our launch files use.

The real libraries are not on PyPI (apt ROS 2 only), so `test_launch_files.py` runs the
launch files against this module instead. It is small but follows the real semantics,
read from ros2/launch and ros2/launch_ros (Humble to Rolling: same code for these parts):

* Visiting: depth first, in order; an action whose condition is false is skipped; what
  ``execute`` returns is visited next (``LaunchService``).
* ``GroupAction`` expands exactly as ``GroupAction.get_sub_entities``: scoped groups push
  and pop launch configurations *and* the environment; ``forwarding=False`` resets both.
* ``DeclareLaunchArgument`` sets its default only when the configuration is unset,
  refuses a value outside ``choices`` and fails without a value or default.
* ``IncludeLaunchDescription`` loads the file, fails on a missing required argument, sets
  its ``launch_arguments`` in the *current* scope and then visits the description.
* ``launch_ros.actions.Node`` records what it would start: the namespace prefixed and
  made absolute like ``launch_ros.utilities``, parameter files and remappings as expanded
  strings, output, emulate_tty and a copy of the environment at that moment.
* Describing without running (``ros2 launch --show-args``, include checks): the walk of
  ``LaunchDescription.get_launch_arguments``, which stops at ``ResetLaunchConfigurations``.

Constructors take the real keyword arguments only (others raise TypeError). Everything
else of launch (events, processes, frontends) is absent: a launch file that needs it
fails here with an AttributeError or ImportError rather than passing by accident.
"""
import contextlib
import importlib.util
import os
import sys
import types


class SubstitutionFailure(RuntimeError):
    pass


class LaunchContext:
    """Launch configurations and environment, with the stacks scoped groups use."""

    def __init__(self, launch_configurations=None, environment=None):
        self.launch_configurations = dict(launch_configurations or {})
        self.environment = dict(os.environ if environment is None else environment)
        self._reset_env = dict(self.environment)  # what ResetEnvironment restores
        self._config_stack = []
        self._env_stack = []
        self.processes = []  # Process records of the nodes started, in order


def perform(context, value):
    """Expand text, a substitution or a list of them into a string."""
    if isinstance(value, str):
        return value
    if isinstance(value, Substitution):
        return value.perform(context)
    return ''.join(perform(context, v) for v in value)


# ------------------------------------------------------------------ substitutions


class Substitution:
    def perform(self, context):
        raise NotImplementedError


class TextSubstitution(Substitution):
    def __init__(self, *, text):
        self.text = text

    def perform(self, context):
        return self.text


class LaunchConfiguration(Substitution):
    def __init__(self, variable_name, *, default=None):
        self.variable_name, self.default = variable_name, default

    def perform(self, context):
        name = perform(context, self.variable_name)
        if name in context.launch_configurations:
            return context.launch_configurations[name]
        if self.default is None:
            raise SubstitutionFailure(f"launch configuration '{name}' does not exist")
        return perform(context, self.default)


class EnvironmentVariable(Substitution):
    def __init__(self, name, *, default_value=None):
        self.name, self.default_value = name, default_value

    def perform(self, context):
        default = None if self.default_value is None else perform(context, self.default_value)
        value = context.environment.get(perform(context, self.name), default)
        if value is None:
            raise SubstitutionFailure(f"environment variable '{self.name}' does not exist")
        return value


class PythonExpression(Substitution):
    def __init__(self, expression, python_modules=('math',)):
        self.expression, self.python_modules = expression, python_modules

    def perform(self, context):
        modules = {name: importlib.import_module(name) for name in self.python_modules}
        return str(eval(perform(context, self.expression), modules))


class PathJoinSubstitution(Substitution):
    def __init__(self, substitutions):
        self.substitutions = substitutions

    def perform(self, context):
        return os.path.join(*(perform(context, s) for s in self.substitutions))


# ------------------------------------------------------------------ conditions


def _truth(context, expression):
    value = perform(context, expression).strip().lower()
    if value in ('true', '1'):
        return True
    if value in ('false', '0'):
        return False
    raise ValueError(f'invalid condition expression {value!r}: expected true/false/1/0')


class IfCondition:
    def __init__(self, predicate_expression):
        self.expression = predicate_expression

    def evaluate(self, context):
        return _truth(context, self.expression)


class UnlessCondition(IfCondition):
    def evaluate(self, context):
        return not _truth(context, self.expression)


# ------------------------------------------------------------------ entities and actions


class LaunchDescription:
    def __init__(self, initial_entities=None):
        self.entities = list(initial_entities or [])

    def visit(self, context):
        return self.entities

    def describe_sub_entities(self):
        return self.entities

    def describe_conditional_sub_entities(self):
        return []


class Action:
    def __init__(self, *, condition=None):
        self.condition = condition

    def visit(self, context):
        if self.condition is not None and not self.condition.evaluate(context):
            return None
        return self.execute(context)

    def execute(self, context):
        return None

    def get_sub_entities(self):
        return []

    def describe_sub_entities(self):
        return self.get_sub_entities() if self.condition is None else []

    def describe_conditional_sub_entities(self):
        return [] if self.condition is None else [('conditional', self.get_sub_entities())]


class DeclareLaunchArgument(Action):
    def __init__(self, name, *, default_value=None, description=None, choices=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.name, self.default_value = name, default_value
        self.description, self.choices = description, choices

    def execute(self, context):
        configs = context.launch_configurations
        if self.name not in configs:
            if self.default_value is None:
                raise RuntimeError(f'Required launch argument "{self.name}" was not provided.')
            configs[self.name] = perform(context, self.default_value)
        if self.choices is not None and configs[self.name] not in self.choices:
            raise RuntimeError(f'Argument "{self.name}" value {configs[self.name]!r} is not '
                               f'one of {self.choices}')


class SetLaunchConfiguration(Action):
    def __init__(self, name, value, **kwargs):
        super().__init__(**kwargs)
        self.name, self.value = name, value

    def execute(self, context):
        context.launch_configurations[perform(context, self.name)] = perform(context,
                                                                             self.value)


class SetEnvironmentVariable(Action):
    def __init__(self, name, value, **kwargs):
        super().__init__(**kwargs)
        self.name, self.value = name, value

    def execute(self, context):
        context.environment[perform(context, self.name)] = perform(context, self.value)


class PushLaunchConfigurations(Action):
    def execute(self, context):
        context._config_stack.append(dict(context.launch_configurations))


class PopLaunchConfigurations(Action):
    def execute(self, context):
        context.launch_configurations = context._config_stack.pop()


class PushEnvironment(Action):
    def execute(self, context):
        context._env_stack.append(dict(context.environment))


class PopEnvironment(Action):
    def execute(self, context):
        context.environment = context._env_stack.pop()


class ResetEnvironment(Action):
    def execute(self, context):
        context.environment = dict(context._reset_env)


class ResetLaunchConfigurations(Action):
    def __init__(self, launch_configurations=None, **kwargs):
        super().__init__(**kwargs)
        self.launch_configurations = launch_configurations

    def execute(self, context):
        # Evaluated before clearing, so values can be passed through the reset.
        kept = {perform(context, k): perform(context, v)
                for k, v in (self.launch_configurations or {}).items()}
        context.launch_configurations = kept


class GroupAction(Action):
    def __init__(self, actions, *, scoped=True, forwarding=True, launch_configurations=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.actions, self.scoped, self.forwarding = list(actions), scoped, forwarding
        self.launch_configurations = launch_configurations or {}

    def get_sub_entities(self):
        sets = [SetLaunchConfiguration(k, v) for k, v in self.launch_configurations.items()]
        if not self.scoped:
            return [*sets, *self.actions]
        if self.forwarding:
            return [PushLaunchConfigurations(), PushEnvironment(), *sets, *self.actions,
                    PopEnvironment(), PopLaunchConfigurations()]
        return [PushLaunchConfigurations(), PushEnvironment(), ResetEnvironment(),
                ResetLaunchConfigurations(self.launch_configurations), *self.actions,
                PopEnvironment(), PopLaunchConfigurations()]

    def execute(self, context):
        return self.get_sub_entities()


class PythonLaunchDescriptionSource:
    def __init__(self, launch_file_path):
        self.location = launch_file_path

    def get_launch_description(self, context=None):
        return load_launch_file(perform(context, self.location))


class IncludeLaunchDescription(Action):
    def __init__(self, launch_description_source, *, launch_arguments=None, **kwargs):
        super().__init__(**kwargs)
        self.source = launch_description_source
        self.launch_arguments = tuple(launch_arguments or ())

    def get_sub_entities(self):
        return [self.source.get_launch_description(LaunchContext())]

    def execute(self, context):
        description = self.source.get_launch_description(context)
        given = {perform(context, k) for k, _ in self.launch_arguments}
        for argument, conditional in launch_arguments(description):
            required = not conditional and argument.default_value is None
            if required and argument.name not in given:
                raise RuntimeError(f'Included launch description missing required argument '
                                   f'{argument.name!r}')
        sets = [SetLaunchConfiguration(k, v) for k, v in self.launch_arguments]
        return [*sets, description]


class Process:
    """What launch_ros would start for a Node: every field already expanded."""

    def __init__(self, **fields):
        self.__dict__.update(fields)

    def __repr__(self):
        return f'Process({self.name} in {self.namespace})'


def _prefix_namespace(base, ns):
    # launch_ros.utilities.prefix_namespace
    if base is None and ns is None:
        return None
    if ns is None:
        combined = base
    elif not base or ns.startswith('/'):
        combined = ns
    else:
        combined = ('' if base == '/' else base) + '/' + ns
    return combined if combined == '/' else combined.rstrip('/')


class Node(Action):
    def __init__(self, *, executable, package=None, name=None, namespace=None,
                 exec_name=None, parameters=None, remappings=None, ros_arguments=None,
                 arguments=None, output='log', emulate_tty=False, additional_env=None,
                 respawn=False, respawn_delay=None, **kwargs):
        super().__init__(**kwargs)
        self.fields = dict(executable=executable, package=package, name=name,
                           namespace=namespace, parameters=parameters or [],
                           remappings=remappings or [], output=output,
                           emulate_tty=emulate_tty, additional_env=additional_env or {})

    def execute(self, context):
        f = self.fields
        ns = None if f['namespace'] is None else perform(context, f['namespace'])
        ns = _prefix_namespace(context.launch_configurations.get('ros_namespace'), ns)
        if ns is not None and not ns.startswith('/'):
            ns = '/' + ns  # launch_ros.utilities.make_namespace_absolute
        env = dict(context.environment)
        env.update({perform(context, k): perform(context, v)
                    for k, v in f['additional_env'].items()})
        context.processes.append(Process(
            package=perform(context, f['package']), executable=perform(context, f['executable']),
            name=perform(context, f['name']), namespace=ns,
            parameters=[perform(context, p) for p in f['parameters']],
            remappings=[(perform(context, a), perform(context, b)) for a, b in f['remappings']],
            output=perform(context, f['output']), emulate_tty=f['emulate_tty'], env=env))


# ------------------------------------------------------------------ running, describing


def load_launch_file(path):
    """Import a launch file by path (as PythonLaunchDescriptionSource does) and call it."""
    spec = importlib.util.spec_from_file_location(os.path.basename(path).replace('.', '_'),
                                                  path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.generate_launch_description()


def visit(entity, context):
    for sub in entity.visit(context) or []:
        visit(sub, context)


def run(description, arguments=None, environment=None):
    """Visit a launch description as `ros2 launch file a:=b` would; return the context."""
    context = LaunchContext(arguments, environment)
    visit(description, context)
    return context


def launch_arguments(description):
    """[(DeclareLaunchArgument, conditional)] as LaunchDescription.get_launch_arguments."""
    found = []

    def walk(entities, conditional):
        for entity in entities:
            if isinstance(entity, DeclareLaunchArgument):
                if entity.name not in (a.name for a, _ in found):
                    found.append((entity, conditional or entity.condition is not None))
            if isinstance(entity, ResetLaunchConfigurations):
                return  # later arguments cannot be set from the command line
            walk(entity.describe_sub_entities(), conditional)
            for _, subs in entity.describe_conditional_sub_entities():
                walk(subs, True)

    walk(description.describe_sub_entities(), False)
    return found


MODULES = {
    'launch': {'LaunchDescription': LaunchDescription, 'LaunchContext': LaunchContext},
    'launch.actions': {c.__name__: c for c in (
        DeclareLaunchArgument, SetLaunchConfiguration, SetEnvironmentVariable, GroupAction,
        IncludeLaunchDescription, PushLaunchConfigurations, PopLaunchConfigurations,
        PushEnvironment, PopEnvironment, ResetEnvironment, ResetLaunchConfigurations)},
    'launch.conditions': {'IfCondition': IfCondition, 'UnlessCondition': UnlessCondition},
    'launch.substitutions': {c.__name__: c for c in (
        LaunchConfiguration, EnvironmentVariable, TextSubstitution, PathJoinSubstitution,
        PythonExpression)},
    'launch.launch_description_sources': {
        'PythonLaunchDescriptionSource': PythonLaunchDescriptionSource},
    'launch_ros': {},
    'launch_ros.actions': {'Node': Node},
}


@contextlib.contextmanager
def installed():
    """Make `import launch` / `import launch_ros` load this stand-in, then restore."""
    saved = {name: sys.modules.get(name) for name in MODULES}
    try:
        for name, attrs in MODULES.items():
            module = types.ModuleType(name, f'bluelm_ros test stand-in for {name}')
            module.__dict__.update(attrs)
            sys.modules[name] = module
        for name in MODULES:  # submodules as attributes, as a package import leaves them
            parent, _, child = name.rpartition('.')
            if parent:
                setattr(sys.modules[parent], child, sys.modules[name])
        yield sys.modules[__name__]
    finally:
        for name, module in saved.items():
            if module is None:
                sys.modules.pop(name, None)
            else:
                sys.modules[name] = module
