"""Every generated interface imports, and AskScene works over real DDS."""
import time

import pytest

from bluelm_ros.ros import interfaces

msg = interfaces.load('msg')
srv = interfaces.load('srv')
action = interfaces.load('action')


def test_every_interface_imports_with_documented_defaults():
    names = {'msg': ['GenerationOptions', 'Timings', 'SceneAnswer', 'SegmentationLabels',
                     'ClassStats'],
             'srv': ['AskScene'], 'action': ['AskScene']}
    mods = {'msg': msg, 'srv': srv, 'action': action}
    for kind, types in names.items():
        for name in types:
            assert hasattr(mods[kind], name), f'{kind}/{name}'
    opts = msg.GenerationOptions()
    # Negative = "node default": an all-default request must be valid.
    assert opts.max_new_tokens == -1 and opts.temperature == -1.0
    assert opts.top_k == -1 and opts.top_p == -1.0 and opts.seed == -1
    req = srv.AskScene.Request()
    assert req.image.width == 0 and len(req.compressed_image.data) == 0
    fb = action.AskScene.Feedback()
    assert hasattr(fb, 'partial_answer') and hasattr(fb, 'new_text')
    assert hasattr(action.AskScene.Result(), 'image_header')


def test_askscene_service_round_trip_over_dds(ros_context, spin):
    """A stand-in AskScene server and a client in separate nodes, real DDS between them."""
    rclpy = ros_context
    server = rclpy.create_node('askscene_standin_server')
    client_node = rclpy.create_node('askscene_standin_client')

    def answer(request, response):
        response.success = True
        response.answer = f'you asked: {request.question}'
        response.image_header.frame_id = 'camera'
        response.timings.total_ms = 1.0
        return response

    server.create_service(srv.AskScene, 'ask', answer)
    client = client_node.create_client(srv.AskScene, 'ask')
    spin(server, client_node)
    try:
        assert client.wait_for_service(timeout_sec=10.0)
        req = srv.AskScene.Request(question='what is ahead?')
        future = client.call_async(req)
        deadline = time.monotonic() + 10.0
        while not future.done() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert future.done(), 'no reply over DDS within 10 s'
        res = future.result()
        assert res.success and res.answer == 'you asked: what is ahead?'
        assert res.image_header.frame_id == 'camera'
    finally:
        client_node.destroy_node()
        server.destroy_node()


def test_library_only_install_explains_itself(tmp_path, monkeypatch):
    """The pip copy (no interfaces) fails with a message naming the fix, not a bare error."""
    import importlib
    import sys
    import types
    fake = types.ModuleType('bluelm_ros_fake')
    fake.__file__ = str(tmp_path / 'bluelm_ros' / '__init__.py')
    monkeypatch.setattr(interfaces, 'bluelm_ros', fake)
    real_import = importlib.import_module

    def no_generated(name, *a):
        if name.startswith('bluelm_ros.'):
            raise ImportError(name)
        return real_import(name, *a)
    monkeypatch.setattr(importlib, 'import_module', no_generated)
    with pytest.raises(interfaces.InterfacesUnavailable, match='colcon'):
        interfaces.load('srv')
    assert 'bluelm_ros.srv' in sys.modules
