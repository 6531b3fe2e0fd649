"""The monitor on OPC UA (monitor/opcua.py), read with asyncua's own client and its uaread/uals
tools: the node set, values equal to the timeline, one update per frame, the alarm event,
history, a dropped or hung client, and the security rule. Servers bind loopback on free ports."""

from __future__ import annotations

import asyncio
import csv
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("asyncua")

from asyncua import Client, ua  # noqa: E402

from crystalscope.errors import CrystalscopeError  # noqa: E402
from crystalscope.monitor.opcua import (NAMESPACE_URI, OpcUaSettings, OpcUaSink, check_settings,  # noqa: E402
                                        node_id_text, variables)
from crystalscope.monitor.sinks import FrameSummary, RunInfo  # noqa: E402
from crystalscope.monitor.timeline import AlarmRule, FrameRecord, Timeline  # noqa: E402

RUN = "batch7"
BIN = Path(sys.executable).parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Feed:
    """A sink serving a hand-made timeline: frames go in as (cex, pg) counts."""

    def __init__(self, tmp_path: Path, **settings):
        self.endpoint = f"opc.tcp://127.0.0.1:{free_port()}/crystalscope/"
        self.timeline = Timeline(["cex", "pg"], "pg", AlarmRule(fraction=0.3, frames=2, smoothing=1.0))
        self.sink = OpcUaSink(OpcUaSettings(self.endpoint, **settings))
        self.sink.start(RunInfo(RUN, tmp_path, tmp_path, self.timeline, []))

    def add(self, cex: int, pg: int) -> FrameRecord:
        i = len(self.timeline.records)
        record = self.timeline.add(FrameRecord(i, f"f{i}.png", 10.0 * i, {"cex": cex, "pg": pg}))
        alarm = self.timeline.alarms[-1] if self.timeline.alarms and self.timeline.alarms[-1]["frame"] == i else None
        self.sink.frame(FrameSummary(record, 1.7e9 + record.time_s, alarm, record.above >= 2))
        return record

    def node(self, client: Client, idx: int, name: str):
        return client.get_node(node_id_text(idx, RUN, name))


@pytest.fixture
def feed(tmp_path):
    served = Feed(tmp_path)
    yield served
    served.sink.close({})


async def wait_for(node, expected, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if (await node.read_data_value(raise_on_bad_status=False)).Value.Value == expected:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{node} never became {expected!r}")


def test_settings_allow_loopback_only_without_credentials(tmp_path):
    assert check_settings(OpcUaSettings("opc.tcp://localhost:4999/x"))[1] == 4999
    assert check_settings(OpcUaSettings("opc.tcp://[::1]:4999/x"))[0] == "::1"
    for host in ("0.0.0.0", "192.168.1.20", "plant-pc"):
        with pytest.raises(CrystalscopeError, match="not a loopback address.*--opcua-user"):
            check_settings(OpcUaSettings(f"opc.tcp://{host}:4840/crystalscope/"))
    assert check_settings(OpcUaSettings("opc.tcp://0.0.0.0:4840/", user="op", password="pw"))[0] == "0.0.0.0"
    with pytest.raises(CrystalscopeError, match="give both"):
        check_settings(OpcUaSettings(user="op"))
    with pytest.raises(CrystalscopeError, match="file not found"):
        check_settings(OpcUaSettings(certificate=tmp_path / "c.der", private_key=tmp_path / "k.pem"))
    with pytest.raises(CrystalscopeError, match="not an endpoint"):
        check_settings(OpcUaSettings("http://127.0.0.1:80/"))


def test_node_set_values_updates_alarm_event_and_history(feed):
    async def scenario():
        async with Client(feed.endpoint) as client:
            idx = await client.get_namespace_index(NAMESPACE_URI)
            run = client.get_node(node_id_text(idx, RUN))
            names = [(await child.read_browse_name()).Name for child in await run.get_children()]
            assert names == [name for name, _ in variables(["cex", "pg"])]
            before = await feed.node(client, idx, "PGFraction").read_data_value(raise_on_bad_status=False)
            assert before.StatusCode.is_bad()  # before any frame (asyncua hands the value over as None)
            updates, events = [], []

            class Handler:
                def datachange_notification(self, node, value, data):
                    updates.append(value)

                def event_notification(self, event):
                    events.append(event)

            sub = await client.create_subscription(20, Handler())
            await sub.subscribe_data_change(feed.node(client, idx, "FramesProcessed"))
            event_type = await client.nodes.base_event_type.get_child([f"{idx}:CrystalscopeAlarmEventType"])
            await sub.subscribe_events(client.nodes.server, event_type)
            await asyncio.sleep(0.3)
            plan = [(9, 0), (8, 1), (5, 5), (4, 6), (9, 0)]  # PG 0, .11, .5, .6, 0: alarms at frame 3
            for cex, pg in plan:
                feed.add(cex, pg)
                await asyncio.sleep(0.15)
            await wait_for(feed.node(client, idx, "FramesProcessed"), len(plan))
            await asyncio.sleep(0.3)
            assert updates[1:] == [1, 2, 3, 4, 5]  # the first is the initial value on subscribing
            assert len(events) == 1 and events[0].Frame == 3 == feed.timeline.alarms[0]["frame"]
            assert "alarm at frame 3" in events[0].Message.Text and events[0].Value == pytest.approx(0.6)
            last = feed.timeline.records[-1]
            assert await feed.node(client, idx, "PGFraction").read_value() == pytest.approx(last.fraction)
            assert await feed.node(client, idx, "Count_cex").read_value() == 9
            assert await feed.node(client, idx, "ParticlesCounted").read_value() == 9
            assert await feed.node(client, idx, "AlarmActive").read_value() is False  # back under the limit
            assert await feed.node(client, idx, "AlarmLimit").read_value() == pytest.approx(0.3)
            stamp = (await feed.node(client, idx, "EWMA").read_data_value()).SourceTimestamp
            assert stamp.timestamp() == pytest.approx(1.7e9 + 40.0)
            d50 = await feed.node(client, idx, "D50_pg").read_data_value(raise_on_bad_status=False)
            assert d50.StatusCode.is_bad()  # no particle sizes in these frames
            history = await feed.node(client, idx, "PGFraction").read_raw_history()
            assert sorted(round(d.Value.Value, 4) for d in history if d.StatusCode.is_good()) == \
                sorted(round(pg / (cex + pg), 4) for cex, pg in plan)

    asyncio.run(asyncio.wait_for(scenario(), 60))


def test_a_dropped_or_hung_client_never_stops_the_monitoring(feed):
    hung = socket.create_connection(("127.0.0.1", int(feed.endpoint.rsplit(":", 1)[1].split("/")[0])))
    hung.sendall(b"HELF")  # half a message header, then silence

    async def scenario():
        client = Client(feed.endpoint)
        await client.connect()
        idx = await client.get_namespace_index(NAMESPACE_URI)
        await client.create_subscription(20, None)
        client.disconnect_socket()  # the network drops: no CloseSession
        started = time.perf_counter()
        for _ in range(200):
            feed.add(7, 3)
        assert time.perf_counter() - started < 2.0  # frame() queues and returns
        async with Client(feed.endpoint) as again:
            await wait_for(feed.node(again, idx, "FramesProcessed"), 200)

    try:
        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        hung.close()


def test_a_user_and_password_turn_anonymous_access_off(tmp_path):
    served = Feed(tmp_path, user="operator", password="s3cret")
    try:
        async def scenario():
            with pytest.raises(ua.UaStatusCodeError):
                async with Client(served.endpoint) as anonymous:
                    await anonymous.nodes.objects.get_children()
            client = Client(served.endpoint)
            client.set_user("operator")
            client.set_password("s3cret")
            await assert_running(served, client)

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        served.sink.close({})


def test_a_port_in_use_is_one_line_before_anything_starts(feed):
    with pytest.raises(CrystalscopeError, match="cannot listen") as caught:
        OpcUaSink(OpcUaSettings(feed.endpoint))
    assert "\n" not in str(caught.value)


def test_close_sets_status_stopped_or_the_error(tmp_path):
    served = Feed(tmp_path)
    served.sink.close({"error": "disk full"})
    assert not served.sink._thread.is_alive()  # noqa: SLF001 - the server thread has ended


def _uaread(endpoint: str, node_id: str) -> str:
    done = subprocess.run([str(BIN / "uaread"), "-u", endpoint, "-n", node_id], capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 0, (node_id, done.stdout, done.stderr)
    return done.stdout.strip().splitlines()[-1]


def test_monitor_watch_with_opcua_through_uaread_and_uals(tiny_onnx, onset_run, tmp_path):
    """AlarmActive turns true at the frame alarms.json names; the values equal timeline.csv's last row."""
    from monitor_runs import SMALL_RULE_OPTIONS, SRC, read_csv

    frames, out = tmp_path / "batch7", tmp_path / "out"
    frames.mkdir()
    endpoint = f"opc.tcp://127.0.0.1:{free_port()}/crystalscope/"
    env = dict(os.environ, PYTHONPATH=str(SRC))
    proc = subprocess.Popen([sys.executable, "-m", "crystalscope", "monitor", str(tiny_onnx), str(frames),
                             "--out", str(out), "--watch", *SMALL_RULE_OPTIONS, "--opcua", endpoint],
                            env=env, stdout=subprocess.PIPE, stderr=(tmp_path / "monitor.log").open("w"), text=True)
    sources = sorted((onset_run / "frames").iterdir())
    ids = {name: node_id_text(2, RUN, name) for name, _ in variables(["cex", "pg"])}
    try:
        # PG starts at 150 s (frame 15): the first 14 frames go in at once, then one at a time
        for path in sources[:14]:
            shutil.copy(path, frames / path.name)
        assert _wait_rows(out, 14, proc), "the monitor did not take the frames"
        seen = [(13, _uaread(endpoint, ids["AlarmActive"]))]
        for i, path in enumerate(sources[14:], start=14):
            shutil.copy(path, frames / path.name)
            assert _wait_rows(out, i + 1, proc), "the monitor did not take the frame"
            if read_csv(out / "timeline.csv")[-1]["alarm"] == "1":
                seen.append((i, _uaread(endpoint, ids["AlarmActive"])))
                break
        time.sleep(0.5)  # alarms.json is written just after timeline.csv
        alarms = json.loads((out / "alarms.json").read_text())
        assert alarms and seen == [(13, "False"), (alarms[0]["frame"], "True")]
        last = read_csv(out / "timeline.csv")[-1]
        assert float(_uaread(endpoint, ids["EWMA"])) == pytest.approx(float(last["ewma"]), abs=1e-6)
        assert int(_uaread(endpoint, ids["Count_pg"])) == int(last["n_pg"])
        assert int(_uaread(endpoint, ids["FramesProcessed"])) == int(last["frame"]) + 1
        listing = subprocess.run([str(BIN / "uals"), "-u", endpoint, "-n", node_id_text(2, RUN)],
                                 capture_output=True, text=True, timeout=60)
        assert listing.returncode == 0 and f"Crystalscope.{RUN}.PGFractionHigh" in listing.stdout
    finally:
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode == 0, (tmp_path / "monitor.log").read_text()[-2000:]


def _wait_rows(out: Path, n: int, proc, timeout=60.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            with open(out / "timeline.csv", newline="") as f:
                if len(list(csv.DictReader(f))) >= n:
                    return True
        except FileNotFoundError:
            pass
        time.sleep(0.1)
    return False


def test_non_loopback_without_credentials_refuses_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from crystalscope.cli import app

    (tmp_path / "frames").mkdir()
    result = CliRunner().invoke(app, ["monitor", str(tmp_path / "m.onnx"), str(tmp_path / "frames"), "--out",
                                      str(tmp_path / "out"), "--opcua", "opc.tcp://0.0.0.0:4840/crystalscope/"])
    assert result.exit_code != 0
    assert "not a loopback address" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "out").exists()


def test_opcua_alone_takes_the_default_endpoint():
    from crystalscope.cli import fill_optional_values
    from crystalscope.monitor.opcua import DEFAULT_ENDPOINT

    assert fill_optional_values(["monitor", "m", "f", "--opcua"])[-1] == DEFAULT_ENDPOINT
    assert fill_optional_values(["monitor", "m", "f", "--opcua", "--watch"]) == \
        ["monitor", "m", "f", "--opcua", DEFAULT_ENDPOINT, "--watch"]
    given = ["monitor", "m", "f", "--opcua", "opc.tcp://127.0.0.1:4900/x/"]
    assert fill_optional_values(given) == given


def test_the_opcua_path_imports_no_torch():
    from monitor_runs import SRC

    code = ("import sys; import crystalscope.monitor.opcua, crystalscope.monitor.run, crystalscope.cli.monitor; "
            "print('torch' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          env=dict(os.environ, PYTHONPATH=str(SRC)))
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_a_certificate_offers_only_basic256sha256_sign_and_encrypt(tmp_path):
    from cryptography.x509.oid import ExtendedKeyUsageOID

    from asyncua.crypto.cert_gen import setup_self_signed_certificate

    uses = [ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.SERVER_AUTH]
    subject = {"organizationName": "crystalscope tests"}

    async def certificates():
        await setup_self_signed_certificate(tmp_path / "server.pem", tmp_path / "server.der",
                                            "urn:crystalscope:monitor", "localhost", uses, subject)
        await setup_self_signed_certificate(tmp_path / "client.pem", tmp_path / "client.der",
                                            "urn:crystalscope:test-client", "localhost", uses, subject)

    asyncio.run(certificates())
    served = Feed(tmp_path, certificate=tmp_path / "server.der", private_key=tmp_path / "server.pem")
    try:
        async def scenario():
            endpoints = await Client(served.endpoint).connect_and_get_server_endpoints()
            assert {e.SecurityPolicyUri.rsplit("#", 1)[-1] for e in endpoints} == {"Basic256Sha256"}
            assert {e.SecurityMode for e in endpoints} == {ua.MessageSecurityMode.SignAndEncrypt}
            client = Client(served.endpoint)
            await client.set_security_string(
                f"Basic256Sha256,SignAndEncrypt,{tmp_path / 'client.der'},{tmp_path / 'client.pem'}")
            await assert_running(served, client)

        asyncio.run(asyncio.wait_for(scenario(), 60))
    finally:
        served.sink.close({})


async def assert_running(served, client) -> None:
    """A client let in by the server's security settings reads the run's Status."""
    async with client:
        idx = await client.get_namespace_index(NAMESPACE_URI)
        assert await served.node(client, idx, "Status").read_value() == "running"
