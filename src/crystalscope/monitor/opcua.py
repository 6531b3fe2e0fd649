"""The monitor on OPC UA (IEC 62541): a sink that serves each frame's values to a DCS or historian.

An asyncua server runs in its own thread with its own event loop. The monitor's thread only
puts frame summaries on that loop's queue (:meth:`OpcUaSink.frame` never waits for the
network), so a client that hangs or drops never holds up the monitoring. Address space
(namespace ``urn:crystalscope``)::

    Objects/Crystalscope/<run>/PGFraction, PGFractionLow, PGFractionHigh, EWMA, AlarmLimit,
        AlarmActive, ParticlesCounted, Count_<class>, D50_<class>, FramesProcessed,
        LastFrameTime, Status

Node ids are strings equal to the browse path below the namespace
(``ns=<i>;s=Crystalscope.<run>.PGFraction``). Values carry the frame's time as source
timestamp; a value the frame does not define (no classified particle, no sizes yet) is NaN
with a Bad status. An alarm fires an ``AlarmEventType``-like event (``CrystalscopeAlarmEventType``)
from the Server object, and PGFraction keeps its history for the run (HistoryRead).
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import logging
import math
import socket
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from urllib.parse import urlparse

from crystalscope.errors import CrystalscopeError
from crystalscope.monitor.sinks import FrameSummary, RunInfo
from crystalscope.runtime import first_line

log = logging.getLogger(__name__)

DEFAULT_ENDPOINT = "opc.tcp://127.0.0.1:4840/crystalscope/"
NAMESPACE_URI = "urn:crystalscope"
ROOT = "Crystalscope"
ALARM_EVENT_TYPE = "CrystalscopeAlarmEventType"
#: UNECE code of the micrometre, encoded as OPC UA Part 8 says (the unit of D50_<class> in um)
MICROMETRE_UNIT_ID = (ord("4") << 8) | ord("H")
#: variables whose every value is kept for HistoryRead
HISTORIZED = ("PGFraction",)
UNECE_UNITS_URI = "http://www.opcfoundation.org/UA/units/un/cefact"


@dataclass(frozen=True)
class OpcUaSettings:
    """Where and how the OPC UA server listens.

    Attributes:
        endpoint: ``opc.tcp://host:port/path``; without credentials only a loopback host.
        user, password: the one user a client must log in as (anonymous access is then off).
        certificate, private_key: the server's certificate (DER or PEM) and key: then only
            Basic256Sha256 Sign&Encrypt is offered.
        start_timeout_s: how long to wait for the server to listen before giving up.
    """

    endpoint: str = DEFAULT_ENDPOINT
    user: str | None = None
    password: str | None = None
    certificate: Path | None = None
    private_key: Path | None = None
    start_timeout_s: float = 60.0


def check_settings(settings: OpcUaSettings) -> tuple[str, int]:
    """The endpoint's (host, port), or a one-line error when it may not be served like this.

    Without credentials the server may listen only on a loopback address: anything else would
    let anyone on the plant network read (and browse) the batch.

    Example:
        >>> check_settings(OpcUaSettings("opc.tcp://127.0.0.1:4841/crystalscope/"))
        ('127.0.0.1', 4841)
    """
    url = urlparse(settings.endpoint)
    try:
        port = url.port or 4840
    except ValueError:
        port = None
    if url.scheme != "opc.tcp" or not url.hostname or port is None:
        raise CrystalscopeError(f"--opcua {settings.endpoint}: not an endpoint; write it like {DEFAULT_ENDPOINT}")
    if (settings.user is None) != (settings.password is None):
        raise CrystalscopeError("--opcua-user and --opcua-password: give both or neither")
    if (settings.certificate is None) != (settings.private_key is None):
        raise CrystalscopeError("--opcua-cert and --opcua-key: give both or neither")
    for option, path in (("--opcua-cert", settings.certificate), ("--opcua-key", settings.private_key)):
        if path is not None and not Path(path).is_file():
            raise CrystalscopeError(f"{option} {path}: file not found")
    if not (is_loopback(url.hostname) or settings.user or settings.certificate):
        raise CrystalscopeError(
            f"--opcua {settings.endpoint}: {url.hostname} is not a loopback address; serving it needs "
            "--opcua-user/--opcua-password or --opcua-cert/--opcua-key (Basic256Sha256 Sign&Encrypt)")
    return url.hostname, port


def check_port_free(endpoint: str, host: str, port: int) -> None:
    """A one-line error now, before any output is written, when the port is taken."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as asyncio's server binds
        try:
            probe.bind((host.strip("[]"), port))
        except OSError as exc:
            raise CrystalscopeError(f"--opcua {endpoint}: cannot listen ({exc.strerror or exc}); "
                                    "choose another port or stop the other server") from None


def is_loopback(host: str) -> bool:
    """``localhost`` or a loopback IP (127.0.0.0/8, ::1); ``0.0.0.0`` is every address, not loopback."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def node_id_text(namespace_index: int, run_name: str, variable: str = "") -> str:
    """The string node id of a run's variable, e.g. ``ns=2;s=Crystalscope.batch7.PGFraction``.

    Example:
        >>> node_id_text(2, "batch7", "EWMA")
        'ns=2;s=Crystalscope.batch7.EWMA'
    """
    path = ".".join(part for part in (ROOT, run_name, variable) if part)
    return f"ns={namespace_index};s={path}"


def variables(class_names: list[str]) -> list[tuple[str, str]]:
    """(name, OPC UA type name) of a run's variables, in browse order."""
    found = [("PGFraction", "Double"), ("PGFractionLow", "Double"), ("PGFractionHigh", "Double"),
             ("EWMA", "Double"), ("AlarmLimit", "Double"), ("AlarmActive", "Boolean"),
             ("ParticlesCounted", "Int64")]
    found += [(f"Count_{c}", "Int64") for c in class_names]
    found += [(f"D50_{c}", "Double") for c in class_names]
    return found + [("FramesProcessed", "Int64"), ("LastFrameTime", "DateTime"), ("Status", "String")]


def frame_values(summary: FrameSummary, run: RunInfo) -> dict[str, object]:
    """The values one frame gives each variable (``None``: not defined by this frame).

    ``ParticlesCounted`` is the classified particles (the sum of ``Count_<class>``); ``D50_<class>``
    is the median equivalent circle diameter of the frame's particles of that class (in the
    run's unit, um with ``--um-per-px``), undefined for a class with no measured particle.
    """
    record = summary.record
    counts = {c: record.counts.get(c, 0) for c in run.class_names}
    values: dict[str, object] = {
        "PGFraction": record.fraction, "PGFractionLow": record.low, "PGFractionHigh": record.high,
        "EWMA": record.ewma, "AlarmLimit": run.rule.fraction, "AlarmActive": summary.alarm_active,
        "ParticlesCounted": sum(counts.values()), "FramesProcessed": record.frame + 1,
        "LastFrameTime": datetime.fromtimestamp(summary.source_time, timezone.utc),
    }
    values.update({f"Count_{c}": n for c, n in counts.items()})
    values.update({f"D50_{c}": _d50(record, c) for c in run.class_names})
    return values


def _d50(record, class_name: str) -> float | None:
    summary = record.sizes.get(class_name)
    return None if summary is None or summary.ecd is None else float(summary.ecd[1])


class OpcUaSink:
    """Serves a monitored run on OPC UA; values are updated once per frame.

    Example:
        >>> sink = OpcUaSink(OpcUaSettings("opc.tcp://127.0.0.1:4841/crystalscope/"))  # doctest: +SKIP
        >>> run_monitor("model.onnx", "frames", "out", watch=True, sinks=[sink])  # doctest: +SKIP
    """

    def __init__(self, settings: OpcUaSettings = OpcUaSettings()):
        check_port_free(settings.endpoint, *check_settings(settings))
        self.settings = settings
        self.namespace_index: int | None = None
        self.run: RunInfo | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._queue: asyncio.Queue | None = None
        self._ready = threading.Event()
        self._error: str | None = None
        self._thread: threading.Thread | None = None

    def start(self, run: RunInfo) -> None:
        """Start the server thread and wait until it listens (a one-line error if it cannot)."""
        _require_asyncua()
        self.run = run
        self._thread = threading.Thread(target=self._serve, name="crystalscope-opcua", daemon=True)
        self._thread.start()
        if not self._ready.wait(self.settings.start_timeout_s):
            raise CrystalscopeError(f"--opcua {self.settings.endpoint}: the server did not start within "
                                    f"{self.settings.start_timeout_s:g} s")
        if self._error is not None:
            raise CrystalscopeError(f"--opcua {self.settings.endpoint}: {self._error}")
        log.info("OPC UA server on %s, run %s", self.settings.endpoint, node_id_text(self.namespace_index, run.name))

    def frame(self, summary: FrameSummary) -> None:
        """Queue the frame for the server thread; returns at once, whatever the clients do."""
        self._put(("frame", summary))

    def close(self, result: dict) -> None:
        """Set Status (``stopped``, or ``error: ...``), stop the server and wait for its thread."""
        status = f"error: {result['error']}" if result.get("error") else "stopped"
        self._put(("close", status))
        if self._thread is not None:
            self._thread.join(timeout=30)

    def _put(self, item) -> None:
        if self._loop is not None and not self._loop.is_closed():
            try:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, item)
            except RuntimeError:  # the loop stopped after an error in the server thread
                log.warning("OPC UA server is not running: frame not served")

    def _serve(self) -> None:
        try:
            asyncio.run(self._main())
        except Exception as exc:  # noqa: BLE001 - reported once; the monitoring goes on without OPC UA
            self._error = self._error or first_line(exc)
            log.error("OPC UA server stopped: %s", first_line(exc))
        finally:
            self._ready.set()

    async def _main(self) -> None:
        self._loop, self._queue = asyncio.get_running_loop(), asyncio.Queue()
        try:
            space = await RunSpace.create(self.settings, self.run)
        except Exception as exc:  # noqa: BLE001 - a port in use, a bad certificate: one line to the user
            self._error = _reason(exc)
            return
        self.namespace_index = space.namespace_index
        self._ready.set()
        try:
            while True:
                kind, item = await self._queue.get()
                if kind == "close":
                    await space.write_status(item)
                    break
                try:
                    await space.write_frame(item)
                except Exception as exc:  # noqa: BLE001 - one bad write must not end the server
                    log.warning("OPC UA update of frame %s failed: %s", item.record.frame, first_line(exc))
        finally:
            await space.stop()


def _reason(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.errno is not None:
        return f"cannot listen ({exc.strerror}); choose another port or stop the other server"
    return first_line(exc)


def _require_asyncua() -> None:
    try:
        import asyncua  # noqa: F401
    except ImportError:
        raise CrystalscopeError("--opcua needs asyncua: pip install 'crystalscope[opcua]'") from None


def nan_if_none(value):
    """NaN for an undefined Double (the OPC UA value then also carries a Bad status)."""
    return math.nan if value is None else value


def password_matches(expected: str, given: str | None) -> bool:
    """Constant-time comparison, so the reply time does not tell how much of a guess was right."""
    return given is not None and hmac.compare_digest(expected.encode(), given.encode())


class RunSpace:
    """The asyncua server and the nodes of one run (lives on the server thread's loop)."""

    def __init__(self, server, namespace_index: int, run: RunInfo, nodes: dict, alarm_events):
        self.server, self.namespace_index, self.run = server, namespace_index, run
        self.nodes, self.alarm_events = nodes, alarm_events
        self.units_set = False

    @classmethod
    async def create(cls, settings: OpcUaSettings, run: RunInfo) -> "RunSpace":
        from asyncua import Server, ua

        server = Server(user_manager=_UserManager(settings) if settings.user else None)
        await server.init()
        server.set_endpoint(settings.endpoint)
        server.set_server_name("crystalscope monitor")
        await server.set_application_uri(f"{NAMESPACE_URI}:monitor")
        if settings.certificate:
            await server.load_certificate(str(settings.certificate))
            await server.load_private_key(str(settings.private_key))
            server.set_security_policy([ua.SecurityPolicyType.Basic256Sha256_SignAndEncrypt])
        else:
            server.set_security_policy([ua.SecurityPolicyType.NoSecurity])
        if settings.user:
            server.set_identity_tokens([ua.UserNameIdentityToken])
        idx = await server.register_namespace(NAMESPACE_URI)
        nodes, run_object = await _add_nodes(server, idx, run)
        event_type = await server.create_custom_event_type(
            idx, ALARM_EVENT_TYPE, ua.ObjectIds.BaseEventType,
            [("Rule", ua.VariantType.String), ("Value", ua.VariantType.Double), ("Frame", ua.VariantType.Int64)])
        alarm_events = await server.get_event_generator(event_type, ua.ObjectIds.Server)
        alarm_events.event.SourceNode, alarm_events.event.SourceName = run_object.nodeid, run.name
        await server.start()
        await _historize(server, nodes["PGFraction"])
        return cls(server, idx, run, nodes, alarm_events)

    async def write_frame(self, summary: FrameSummary) -> None:
        from asyncua import ua

        stamp = datetime.fromtimestamp(summary.source_time, timezone.utc)
        values = frame_values(summary, self.run)
        for name, value in values.items():
            data_value = _data_value(name, value, stamp, ua)
            await self.server.write_attribute_value(self.nodes[name].nodeid, data_value)
            if name in HISTORIZED:
                await self.server.iserver.history_manager.storage.save_node_value(self.nodes[name].nodeid, data_value)
        if not self.units_set and any(values[f"D50_{c}"] is not None for c in self.run.class_names):
            await self._add_units(self.run.timeline.unit)
        if summary.alarm is not None:
            await self._fire(summary, stamp)

    async def _fire(self, summary: FrameSummary, stamp: datetime) -> None:
        alarm = summary.alarm
        event = self.alarm_events.event
        event.Rule, event.Value, event.Frame = alarm["rule"], float(alarm["ewma"]), int(alarm["frame"])
        event.Severity = 700
        await self.alarm_events.trigger(time_attr=stamp, message=(
            f"{self.run.name}: alarm at frame {alarm['frame']} ({alarm['file']}, t={alarm['time_s']:g} s): "
            f"EWMA {alarm['ewma']:.3f} above {self.run.rule.fraction:g} ({alarm['rule']})"))

    async def _add_units(self, unit: str) -> None:
        from asyncua import ua

        info = ua.EUInformation(NamespaceUri=UNECE_UNITS_URI, UnitId=MICROMETRE_UNIT_ID if unit == "um" else -1,
                                DisplayName=ua.LocalizedText(unit), Description=ua.LocalizedText(unit))
        for c in self.run.class_names:
            await self.nodes[f"D50_{c}"].add_property(self.namespace_index, "EngineeringUnits", info)
        self.units_set = True

    async def write_status(self, status: str) -> None:
        from asyncua import ua

        await self.server.write_attribute_value(self.nodes["Status"].nodeid, ua.DataValue(
            ua.Variant(status, ua.VariantType.String), SourceTimestamp=datetime.now(timezone.utc),
            ServerTimestamp=datetime.now(timezone.utc)))

    async def stop(self) -> None:
        await self.server.stop()


async def _historize(server, node) -> None:
    """Make ``node`` history-readable and keep every value of the run in memory.

    The history is written with each frame's value rather than through
    ``historize_node_data_change``: that one records through a subscription, which drops a
    value equal to the one before (two frames at 0.0 PG would leave one history entry).
    """
    from asyncua import ua

    await node.write_attribute(ua.AttributeIds.Historizing, ua.DataValue(True))
    await node.set_attr_bit(ua.AttributeIds.AccessLevel, ua.AccessLevel.HistoryRead)
    await node.set_attr_bit(ua.AttributeIds.UserAccessLevel, ua.AccessLevel.HistoryRead)
    await server.iserver.history_manager.storage.new_historized_node(node.nodeid, None, 0)


async def _add_nodes(server, idx: int, run: RunInfo) -> tuple[dict, object]:
    """Objects/Crystalscope/<run>/<variables>, each with a string node id equal to its path."""
    from asyncua import ua

    def node_id(*parts: str):
        return ua.NodeId(".".join((ROOT, *parts)), idx)

    root = await server.nodes.objects.add_object(node_id(), ua.QualifiedName(ROOT, idx))
    run_object = await root.add_object(node_id(run.name), ua.QualifiedName(run.name, idx))
    nodes = {}
    for name, type_name in variables(run.class_names):
        initial = _initial(name, type_name, run, ua)
        nodes[name] = await run_object.add_variable(node_id(run.name, name), ua.QualifiedName(name, idx),
                                                    initial.Value)
        await server.write_attribute_value(nodes[name].nodeid, initial)  # with its status
    return nodes, run_object


def _initial(name: str, type_name: str, run: RunInfo, ua):
    """Before the first frame: the limit and Status are known, every other value is not."""
    # timestamps on every value: the history's time-range reads compare them
    now = datetime.now(timezone.utc)
    if name == "AlarmLimit":
        return ua.DataValue(ua.Variant(run.rule.fraction, ua.VariantType.Double), SourceTimestamp=now, ServerTimestamp=now)
    if name == "Status":
        return ua.DataValue(ua.Variant("running", ua.VariantType.String), SourceTimestamp=now, ServerTimestamp=now)
    if name == "FramesProcessed":
        return ua.DataValue(ua.Variant(0, ua.VariantType.Int64), SourceTimestamp=now, ServerTimestamp=now)
    defaults = {"Double": math.nan, "Boolean": False, "Int64": 0,
                "DateTime": datetime.fromtimestamp(0, timezone.utc), "String": ""}
    return ua.DataValue(ua.Variant(defaults[type_name], getattr(ua.VariantType, type_name)),
                        StatusCode=ua.StatusCode(ua.StatusCodes.BadWaitingForInitialData),
                        SourceTimestamp=now, ServerTimestamp=now)


def _data_value(name: str, value, stamp: datetime, ua):
    type_name = dict(variables([]))[name] if not name.startswith(("Count_", "D50_")) else (
        "Int64" if name.startswith("Count_") else "Double")
    variant_type = getattr(ua.VariantType, type_name)
    status = ua.StatusCode(ua.StatusCodes.Good if value is not None else ua.StatusCodes.BadNoData)
    return ua.DataValue(ua.Variant(nan_if_none(value), variant_type), StatusCode=status,
                        SourceTimestamp=stamp, ServerTimestamp=datetime.now(timezone.utc))


class _UserManager:
    """One user and password (from --opcua-user/--opcua-password); anonymous clients are refused."""

    def __init__(self, settings: OpcUaSettings):
        self.user, self.password = settings.user, settings.password

    def get_user(self, iserver, username=None, password=None, certificate=None):
        from asyncua.crypto.permission_rules import User, UserRole

        if username == self.user and password_matches(self.password, password):
            return User(role=UserRole.User, name=username)
        return None
