"""Attacks on `monitor --opcua`: an open plant-network address, a taken port, a client that
connects and never speaks while the monitor runs and stops (tests/attacks.py records them)."""

from __future__ import annotations

import socket
import threading
import time

import pytest

from attacks import FIXES, check_attack, check_attack_process

pytest.importorskip("asyncua")
pytest.importorskip("onnxruntime")
pytest.importorskip("scipy")

FIXES.extend([
    ("OPC UA open to the plant network", "the monitor had no OPC UA server; an analyser server bound to every "
     "address serves anyone", "`monitor/opcua.check_settings`: without --opcua-user/--opcua-password or "
     "--opcua-cert/--opcua-key only a loopback address; one line otherwise"),
    ("OPC UA port taken", "a server that cannot listen would fail after the outputs were claimed",
     "`monitor/opcua.check_port_free` before any output is written: one line"),
    ("a hung OPC UA client", "a network sink called on the monitor's thread waits for its slowest client",
     "`OpcUaSink` runs its server on its own thread and loop; the monitor only queues each frame"),
])


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def frames(tmp_path_factory):
    from crystalscope.monitor.frames import ProcessSpec, generate_process

    run = tmp_path_factory.mktemp("opcua-attack") / "run"
    generate_process(run, ProcessSpec(frames=4, width=256, height=192, interval_s=10.0, difficulty="easy", seed=2))
    return run / "frames"


def test_opcua_on_every_address_without_credentials_is_refused(assets, frames, tmp_path):
    check_attack("opcua on 0.0.0.0 without credentials",
                 ["monitor", assets["onnx"], frames, "--out", tmp_path / "out", "--opcua",
                  "opc.tcp://0.0.0.0:4840/crystalscope/"],
                 code=2, words=("not a loopback address", "--opcua-user"), roots=(frames,))
    assert not (tmp_path / "out").exists()


def test_opcua_on_a_taken_port_is_one_line_and_writes_nothing(assets, frames, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        check_attack("opcua on a port in use",
                     ["monitor", assets["onnx"], frames, "--out", tmp_path / "out", "--opcua",
                      f"opc.tcp://127.0.0.1:{port}/crystalscope/"],
                     code=2, words=("cannot listen",), roots=(frames,))
    assert not (tmp_path / "out").exists()


def test_a_client_that_never_speaks_does_not_stop_the_monitor(assets, frames, tmp_path):
    port = _free_port()
    hung: list[socket.socket] = []
    done = threading.Event()

    def connect_and_stay_silent():
        while not done.is_set():  # keep trying until the server listens, then hold the socket open
            try:
                s = socket.create_connection(("127.0.0.1", port), timeout=1)
                s.sendall(b"HEL")  # a third of a message header, then nothing
                hung.append(s)
                return
            except OSError:
                time.sleep(0.02)

    thread = threading.Thread(target=connect_and_stay_silent, daemon=True)
    thread.start()
    try:
        check_attack_process("opcua client that hangs", ["monitor", assets["onnx"], frames, "--out", tmp_path / "out",
                                                         "--opcua", f"opc.tcp://127.0.0.1:{port}/crystalscope/"],
                             code=0, words=("4 frames",), roots=(frames,), timeout=120)
    finally:
        done.set()
        for s in hung:
            s.close()
