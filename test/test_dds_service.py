"""Services and unsubscribing on the DDS runtime, in this process over loopback (issue 19's
``~/enable`` on Cyclone DDS): rmw_cyclonedds_cpp's request/reply layout, a call answered with
its header, and a deleted reader that publishers stop matching."""

from __future__ import annotations

import struct
import threading
import time

import pytest
from dds_env import loopback_domain, wait_until

pytest.importorskip("cyclonedds", reason="the DDS runtime needs cyclonedds (pip install '.[dds]')")

from dds_perception.ros import messages
from dds_perception.ros.dds import DdsError
from dds_perception.ros.dds import runtime as rt
from dds_perception.ros.dds import types as idl


def test_dds_service_topic_and_type_names() -> None:
    assert rt.service_topics("~/enable", "/", "dds_detector") == (
        "rq/dds_detector/enableRequest",
        "rr/dds_detector/enableReply",
    )
    assert rt.service_topics("~/enable", "/front", "dds_detector")[0] == (
        "rq/front/dds_detector/enableRequest"
    )
    request, response = idl.service_types("std_srvs/srv/SetBool")
    assert request.__idl_typename__ == "std_srvs::srv::dds_::SetBool_Request_"
    assert response.__idl_typename__ == "std_srvs::srv::dds_::SetBool_Response_"
    with pytest.raises(DdsError, match=r"no DDS service type for 'std_srvs/srv/Trigger'"):
        idl.service_types("std_srvs/srv/Trigger")


def test_dds_service_wire_layout_is_rmw_cyclonedds() -> None:
    """CDR little endian: the 8-byte client id and 8-byte sequence number, then the fields
    (SetBool.Response: bool, 3 bytes padding, string length incl. NUL, the bytes)."""
    request = idl.SetBoolRequest(client_guid=0x0102030405060708, sequence_number=3, data=True)
    assert request.serialize() == (
        b"\x00\x01\x00\x00" + struct.pack("<Qq?", 0x0102030405060708, 3, True)
    )
    response = idl.SetBoolResponse(client_guid=7, sequence_number=9, success=True, message="ok")
    assert response.serialize() == (
        b"\x00\x01\x00\x00" + struct.pack("<Qq?3xI", 7, 9, True, 3) + b"ok\x00"
    )


@pytest.fixture(scope="module")
def domain() -> int:
    with loopback_domain() as domain:
        yield domain


def test_dds_service_call_and_unsubscribe(domain: int) -> None:
    classes = messages.rosbags_classes()
    types = messages.MSGTYPES
    server = rt.DdsRuntime(domain=domain, node_name="dds_detector", typestore=classes.typestore)
    client = rt.DdsRuntime(domain=domain, typestore=classes.typestore)
    received: list[str] = []
    requests: list[bool] = []
    try:
        sub = server.subscribe("chatter", types["String"], lambda m: received.append(m.data))

        def handler(request):
            requests.append(bool(request.data))
            if request.data:
                return {"success": True, "message": "on"}
            server.unsubscribe(sub)  # from the dispatcher thread, inside a callback
            return {"success": True, "message": "off"}

        server.service("~/enable", "std_srvs/srv/SetBool", handler)
        server.start()
        client.start()
        pub = client.publisher("chatter", types["String"], rt.reliable_qos(10))
        assert wait_until(lambda: pub.subscription_count() == 1)
        pub.publish(messages.string_msg("before", classes))
        assert wait_until(lambda: received == ["before"])

        enable = client.service_client("/dds_detector/enable", "std_srvs/srv/SetBool")
        other = client.service_client("/dds_detector/enable", "std_srvs/srv/SetBool")
        reply = enable.call(data=False)
        assert (reply.success, reply.message) == (True, "off") and requests == [False]
        assert wait_until(lambda: pub.subscription_count() == 0), "the reader was not deleted"
        pub.publish(messages.string_msg("after", classes))
        time.sleep(0.3)
        assert received == ["before"]
        server.unsubscribe(sub)  # idempotent

        # two clients at once: each gets its own answer (told apart by the request header)
        answers: dict[str, str] = {}

        def ask(name: str, service: rt.DdsServiceClient) -> None:
            answers[name] = service.call(data=True).message

        threads = [threading.Thread(target=ask, args=a) for a in (("a", enable), ("b", other))]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(20)
        assert answers == {"a": "on", "b": "on"} and requests == [False, True, True]
    finally:
        client.close()
        server.close()


def test_dds_service_client_times_out_without_server(domain: int) -> None:
    client = rt.DdsRuntime(domain=domain, typestore=messages.typestore())
    try:
        missing = client.service_client("/nobody/enable", "std_srvs/srv/SetBool")
        with pytest.raises(DdsError, match=r"service /nobody/enable not available after 0 s"):
            missing.call(timeout=0.2, data=True)
    finally:
        client.close()


def test_dds_runtime_callback_bug_keeps_traceback_and_dispatcher(domain: int) -> None:
    """A callback's bug is reported with its traceback (once per type and topic), bad input as
    one line; the dispatcher goes on delivering the next samples (issue 18.1)."""
    classes = messages.rosbags_classes()
    types = messages.MSGTYPES
    lines: list[str] = []
    bugs: list[str] = []
    runtime = rt.DdsRuntime(
        domain=domain, typestore=classes.typestore, on_error=lines.append, on_bug=bugs.append
    )
    delivered: list[str] = []

    def callback(msg) -> None:
        if msg.data == "bug":
            raise KeyError("missing field")
        if msg.data == "bad":
            raise messages.MessageError("std_msgs/String.data: not a camera name")
        delivered.append(msg.data)

    try:
        runtime.subscribe("bugs", types["String"], callback)
        runtime.subscribe("bad", types["String"], callback)
        runtime.start()
        pub = runtime.publisher("bugs", types["String"], rt.reliable_qos(10))
        bad_pub = runtime.publisher("bad", types["String"], rt.reliable_qos(10))
        assert wait_until(
            lambda: pub.subscription_count() == 1 and bad_pub.subscription_count() == 1
        )
        for text in ("bug", "ok 1", "bug", "ok 2"):
            pub.publish(messages.string_msg(text, classes))
        bad_pub.publish(messages.string_msg("bad", classes))
        assert wait_until(lambda: delivered == ["ok 1", "ok 2"] and lines)
    finally:
        runtime.close()
    (trace,) = bugs  # the second KeyError on the topic: throttled, no second traceback
    assert trace.startswith("rt/bugs: KeyError: 'missing field'\n")
    assert "Traceback (most recent call last)" in trace and "in callback" in trace
    assert lines == ["rt/bad: MessageError: std_msgs/String.data: not a camera name"]
