"""The dev Workload API agent (`sidecar pki agent`) over a real unix socket, read by a real
gRPC client: the raw stubs for exact status codes and contents, py-spiffe's client where
its behaviour is what the sidecar's future Workload API source would see.

Every wait is bounded (`Stream.next` and the call deadline); every agent is closed by its
fixture or test.
"""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import warnings
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
from agent_fixtures import (  # noqa: F401  (fixtures, found by pytest)
    ID_DB,
    ID_WEB,
    ca_fixture,
    other_root_fixture,
    root_fixture,
)
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from sidecar.identity import der_certs
from sidecar.problems import Problem
from sidecar.tools.pki import CA, init_ca_dir, new_root
from sidecar.tools.pki.agent import (
    HEADER_MISSING,
    NO_IDENTITY,
    Agent,
    Drop,
    Entry,
    has_security_header,
)
from sidecar.tools.pki.agent_control import ControlServer, send

with warnings.catch_warnings():
    warnings.simplefilter("ignore")  # spiffe's DSA import warning, as in agent.py
    import grpc
    from spiffe import WorkloadApiClient
    from spiffe._proto import workload_pb2, workload_pb2_grpc

HEADER = [("workload.spiffe.io", "true")]
WAIT = 10.0  # any one response; generous for a loaded 2-core machine
QUIET = 0.5  # how long "nothing arrives" is watched for


def _split_der(blob: bytes) -> list[x509.Certificate]:
    """Concatenated DER certificates, as the Workload API carries chains and bundles: read
    by the sidecar's own reader, which must find every one whole."""
    problems: list[Problem] = []
    certs = der_certs("the agent's answer", blob, problems)
    assert not problems, problems
    return certs


class Stream:
    """A server-streaming call read by a thread into a queue, so every wait has a bound."""

    def __init__(self, call: Any) -> None:
        self.call = call
        self.items: queue.Queue[Any] = queue.Queue()
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            for item in self.call:
                self.items.put(item)
            self.items.put(StopIteration())
        except grpc.RpcError as e:
            self.items.put(e)

    def next(self, timeout: float = WAIT) -> Any:
        item = self.items.get(timeout=timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    def quiet(self, for_: float = QUIET) -> bool:
        try:
            self.items.get(timeout=for_)
        except queue.Empty:
            return True
        return False

    def close(self) -> None:
        self.call.cancel()
        self._thread.join(timeout=WAIT)


class Client:
    def __init__(self, socket: Path) -> None:
        # A channel of its own subchannels: gRPC shares them process-wide by default, so a
        # new client would inherit the backoff of one that saw the agent down.
        self.channel = grpc.insecure_channel(
            f"unix:{socket}", options=[("grpc.use_local_subchannel_pool", 1)]
        )
        self.stub = workload_pb2_grpc.SpiffeWorkloadAPIStub(self.channel)
        self.streams: list[Stream] = []

    def svids(self, metadata: list[tuple[str, str]] | None = HEADER) -> Stream:
        call = self.stub.FetchX509SVID(
            workload_pb2.X509SVIDRequest(), metadata=metadata, timeout=60
        )
        self.streams.append(Stream(call))
        return self.streams[-1]

    def bundles(self, metadata: list[tuple[str, str]] | None = HEADER) -> Stream:
        call = self.stub.FetchX509Bundles(
            workload_pb2.X509BundlesRequest(), metadata=metadata, timeout=60
        )
        self.streams.append(Stream(call))
        return self.streams[-1]

    def close(self) -> None:
        for s in self.streams:
            s.close()
        self.channel.close()


@pytest.fixture
def agent(tmp_path: Path, ca: CA, other_root: x509.Certificate) -> Iterator[Agent]:
    a = Agent(ca, tmp_path / "agent.sock", [Entry(ID_WEB)], federated={"other.org": [other_root]})
    with a:
        yield a


@pytest.fixture
def client(agent: Agent) -> Iterator[Client]:
    c = Client(agent.socket)
    yield c
    c.close()


def _status(stream: Stream) -> tuple[grpc.StatusCode, str]:
    with pytest.raises(grpc.RpcError) as info:
        stream.next()
    return info.value.code(), info.value.details()


def test_first_response_is_a_valid_svid_from_the_ca(client: Client, ca: CA,
                                                    other_root: x509.Certificate) -> None:
    response = client.svids().next()
    assert len(response.svids) == 1
    svid = response.svids[0]
    assert svid.spiffe_id == ID_WEB
    assert svid.hint == ""
    leaf, *intermediates = _split_der(svid.x509_svid)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.UniformResourceIdentifier) == [ID_WEB]
    assert intermediates == [ca.cert]  # leaf first, then the intermediate, never the root
    leaf.verify_directly_issued_by(ca.cert)
    (root,) = _split_der(svid.bundle)
    assert root == ca.trust_anchor
    ca.cert.verify_directly_issued_by(root)
    key = serialization.load_der_private_key(svid.x509_svid_key, None)
    spki = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    assert key.public_key().public_bytes(*spki) == leaf.public_key().public_bytes(*spki)
    assert list(response.crl) == []
    assert dict(response.federated_bundles) == {
        "spiffe://other.org": other_root.public_bytes(serialization.Encoding.DER)
    }


def test_rotation_sends_a_new_svid_within_the_period(tmp_path: Path, ca: CA) -> None:
    with Agent(ca, tmp_path / "a.sock", [Entry(ID_WEB)], every=0.5) as agent:
        c = Client(agent.socket)
        try:
            stream = c.svids()
            first = stream.next().svids[0]
            second = stream.next(timeout=0.5 + WAIT).svids[0]  # within the period, + load
            assert second.x509_svid != first.x509_svid
            assert second.x509_svid_key != first.x509_svid_key  # a fresh key each time
            assert second.bundle == first.bundle
        finally:
            c.close()


@pytest.mark.parametrize("metadata", [None, [("workload.spiffe.io", "True")],
                                      [("workload.spiffe.io", "yes")]])
def test_a_call_without_the_security_header_is_refused(
    client: Client, metadata: list[tuple[str, str]] | None
) -> None:
    assert _status(client.svids(metadata)) == (grpc.StatusCode.INVALID_ARGUMENT, HEADER_MISSING)
    assert _status(client.bundles(metadata)) == (grpc.StatusCode.INVALID_ARGUMENT,
                                                 HEADER_MISSING)


@pytest.mark.parametrize(("metadata", "ok"), [
    ([("workload.spiffe.io", "true")], True),
    ([("other", "x"), ("workload.spiffe.io", "true")], True),
    ([], False),
    ([("workload.spiffe.io", "TRUE")], False),  # case sensitive, as the spec says
    ([("workload.spiffe.io", "true"), ("workload.spiffe.io", "true")], False),  # as SPIRE
])
def test_security_header_rule(metadata: list[tuple[str, str]], ok: bool) -> None:
    assert has_security_header(metadata) is ok


def test_refuse_answers_permission_denied_until_serve(agent: Agent, client: Client) -> None:
    open_stream = client.svids()
    open_stream.next()
    agent.refuse()
    assert _status(open_stream) == (grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
    assert _status(client.svids()) == (grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
    assert _status(client.bundles()) == (grpc.StatusCode.PERMISSION_DENIED, NO_IDENTITY)
    agent.serve()
    assert client.svids().next().svids[0].spiffe_id == ID_WEB


def test_stall_accepts_and_sends_nothing_until_serve(agent: Agent, client: Client) -> None:
    open_stream = client.svids()
    served = open_stream.next()
    agent.stall()
    stalled = client.svids()
    agent.rotate()
    assert stalled.quiet() and open_stream.quiet()
    agent.serve()
    newest = stalled.next().svids[0]
    assert newest.x509_svid != served.svids[0].x509_svid
    assert open_stream.next().svids[0].x509_svid == newest.x509_svid


def test_drop_end_closes_open_streams_cleanly(agent: Agent, client: Client) -> None:
    svids, bundles = client.svids(), client.bundles()
    svids.next()
    bundles.next()
    agent.drop(Drop.END)
    with pytest.raises(StopIteration):
        svids.next()
    with pytest.raises(StopIteration):
        bundles.next()
    assert svids.call.code() == grpc.StatusCode.OK
    assert client.svids().next().svids  # the next call is served


def test_drop_unavailable_aborts_open_streams(agent: Agent, client: Client) -> None:
    stream = client.svids()
    stream.next()
    agent.drop(Drop.UNAVAILABLE)
    assert _status(stream)[0] == grpc.StatusCode.UNAVAILABLE
    assert client.svids().next().svids


def test_rotate_now_pushes_to_every_open_stream(agent: Agent, client: Client) -> None:
    a, b = client.svids(), client.svids()
    before = a.next().svids[0].x509_svid
    b.next()
    assert agent.rotate() == 2
    (new,) = agent.current
    for stream in (a, b):
        leaf = _split_der(stream.next().svids[0].x509_svid)[0]
        assert leaf.serial_number == new.serial
    assert leaf.public_bytes(serialization.Encoding.DER) != _split_der(before)[0].public_bytes(
        serialization.Encoding.DER)


def test_federated_bundles_are_added_and_dropped(agent: Agent, client: Client,
                                                 other_root: x509.Certificate) -> None:
    svids, bundles = client.svids(), client.bundles()
    assert "spiffe://other.org" in svids.next().federated_bundles
    assert set(bundles.next().bundles) == {"spiffe://example.org", "spiffe://other.org"}
    third = new_root("third.org").cert
    agent.federate("third.org", [third])
    assert set(svids.next().federated_bundles) == {"spiffe://other.org", "spiffe://third.org"}
    assert _split_der(bundles.next().bundles["spiffe://third.org"]) == [third]
    assert agent.unfederate("other.org")
    assert set(svids.next().federated_bundles) == {"spiffe://third.org"}
    assert set(bundles.next().bundles) == {"spiffe://example.org", "spiffe://third.org"}
    assert not agent.unfederate("other.org")


def test_a_rotation_does_not_resend_unchanged_bundles(agent: Agent, client: Client) -> None:
    bundles = client.bundles()
    bundles.next()
    agent.rotate()
    assert bundles.quiet()


def test_stop_removes_the_socket_and_start_serves_again(agent: Agent, client: Client) -> None:
    stream = client.svids()
    stream.next()
    agent.stop()
    assert not agent.socket.exists()
    assert _status(stream)[0] == grpc.StatusCode.UNAVAILABLE
    assert _status(client.svids())[0] == grpc.StatusCode.UNAVAILABLE
    agent.start()
    assert agent.socket.is_socket()
    fresh = Client(agent.socket)  # a new channel, as a client that backed off would have
    try:
        assert fresh.svids().next().svids[0].spiffe_id == ID_WEB
    finally:
        fresh.close()


def test_several_svids_keep_their_order_and_hints(tmp_path: Path, ca: CA) -> None:
    entries = [Entry(ID_WEB, "external"), Entry(ID_DB, "internal")]
    with Agent(ca, tmp_path / "a.sock", entries) as agent:
        c = Client(agent.socket)
        try:
            svids = c.svids().next().svids
        finally:
            c.close()
    assert [(s.spiffe_id, s.hint) for s in svids] == [(ID_WEB, "external"), (ID_DB, "internal")]
    assert svids[0].x509_svid_key != svids[1].x509_svid_key


def test_revoke_puts_a_crl_in_the_responses(agent: Agent, client: Client, ca: CA) -> None:
    stream = client.svids()
    stream.next()
    (current,) = agent.current
    agent.revoke(current.serial)
    (crl_der,) = stream.next().crl
    crl = x509.load_der_x509_crl(crl_der)
    assert crl.is_signature_valid(ca.cert.public_key())  # type: ignore[arg-type]
    assert crl.get_revoked_certificate_by_serial_number(current.serial) is not None


def test_py_spiffe_client_streams_contexts_with_a_callback(agent: Agent) -> None:
    """What the sidecar's Workload API source would use: a callback on gRPC's thread."""
    contexts: queue.Queue[Any] = queue.Queue()
    with WorkloadApiClient(f"unix://{agent.socket}") as c:
        handle = c.stream_x509_contexts(contexts.put, contexts.put)
        try:
            first = contexts.get(timeout=WAIT)
            agent.rotate()
            second = contexts.get(timeout=WAIT)
        finally:
            handle.cancel()
    assert str(first.default_svid.spiffe_id) == ID_WEB
    assert first.default_svid.leaf.serial_number != second.default_svid.leaf.serial_number
    # Ours and the federated bundle, one per trust domain (py-spiffe drops `crl` and `hint`).
    domains = {str(b.trust_domain) for b in second.x509_bundle_set.bundles}
    assert domains == {"example.org", "other.org"}


def test_control_socket_drives_the_agent(agent: Agent, client: Client, tmp_path: Path) -> None:
    other = tmp_path / "ca-other"
    init_ca_dir(other, "else.org")
    control = ControlServer(tmp_path / "ctl.sock", agent)
    control.serve_in_thread()
    try:
        path = tmp_path / "ctl.sock"
        assert send(path, "status").startswith("ok serving=yes mode=serve generation=1")
        assert send(path, "rotate").startswith("ok generation=2")
        assert send(path, "refuse").startswith("ok serving=yes mode=refuse")
        assert _status(client.svids())[0] == grpc.StatusCode.PERMISSION_DENIED
        assert send(path, "serve").startswith("ok serving=yes mode=serve")
        assert send(path, f"federate else.org {other}").endswith("federated=else.org,other.org "
                                                                 f"sent={agent.sent}")
        assert "spiffe://else.org" in client.svids().next().federated_bundles
        assert "is the CA of trust domain 'else.org'" in send(path, f"federate x.org {other}")
        assert send(path, "unfederate nowhere.org").startswith("error nowhere.org is not")
        assert send(path, "stop").startswith("ok serving=no")
        assert not agent.socket.exists()
        assert send(path, "start").startswith("ok serving=yes")
        assert send(path, "drop sideways").startswith("error unknown command")
    finally:
        control.close()


# --- the command -----------------------------------------------------------------------


def _sidecar(*args: str) -> list[str]:
    return [sys.executable, "-W", "ignore", "-m", "sidecar", *args]


def test_the_command_serves_until_sigterm(tmp_path: Path) -> None:
    init_ca_dir(tmp_path / "ca", "example.org")
    init_ca_dir(tmp_path / "cb", "other.org")
    sock = tmp_path / "a.sock"
    proc = subprocess.Popen(
        [*_sidecar("pki", "agent", "--dir", str(tmp_path / "ca"), "--socket", str(sock),
                   "--spiffe-id", ID_WEB, "--spiffe-id", f"{ID_DB}=internal",
                   "--federate", f"other.org={tmp_path / 'cb'}", "--every", "1h")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert proc.stdout is not None
        for _ in range(3):  # two rotation lines, then the serving line
            line = proc.stdout.readline()
        assert line.startswith(f"serving the Workload API on unix://{sock}"), line
        c = Client(sock)
        try:
            response = c.svids().next()
        finally:
            c.close()
        assert [(s.spiffe_id, s.hint) for s in response.svids] == [(ID_WEB, ""),
                                                                    (ID_DB, "internal")]
        assert list(response.federated_bundles) == ["spiffe://other.org"]
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=WAIT) == 0
        assert not sock.exists()
    finally:
        proc.kill()
        proc.wait(timeout=WAIT)


@pytest.mark.parametrize(("args", "message"), [
    (["--spiffe-id", "spiffe://other.org/x"], "belongs to trust domain 'other.org'"),
    (["--spiffe-id", ID_WEB, "--federate", "other.org"], "write it TD=CA_DIR"),
    (["--spiffe-id", ID_WEB, "--federate", "example.org=ca"], "this agent's own trust domain"),
    (["--spiffe-id", ID_WEB, "--federate", "x.org=ca"], "is the CA of trust domain 'example.org'"),
    (["--spiffe-id", ID_WEB, "--socket", "no/such/dir/a.sock"], "directory no/such/dir does not"),
    (["--spiffe-id", ID_WEB, "--socket", "s" * 108], "a unix socket path holds at most 107"),
    (["--spiffe-id", ID_WEB, "--socket", "ca/root.pem"], "exists and is not a socket"),
])
def test_the_command_says_what_is_wrong(tmp_path: Path, args: list[str], message: str) -> None:
    init_ca_dir(tmp_path / "ca", "example.org")
    run = subprocess.run(
        _sidecar("pki", "agent", "--dir", "ca", "--socket", "a.sock", *args),
        cwd=tmp_path, capture_output=True, text=True, timeout=60,
    )
    assert run.returncode == 1
    assert message in run.stderr, run.stderr
    assert not (tmp_path / "a.sock").exists()


def test_the_command_says_what_to_install_without_the_extra(tmp_path: Path) -> None:
    # `sys.modules[name] = None` makes that import fail as a missing package does.
    code = ("import sys; sys.modules['grpc'] = None; from sidecar.cli import main; "
            f"sys.exit(main(['pki', 'agent', '--dir', 'ca', '--socket', 's', "
            f"'--spiffe-id', {ID_WEB!r}]))")
    run = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                         text=True, timeout=60, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert run.returncode == 1
    assert "pip install 'sidecar[spire]'" in run.stderr, run.stderr


def test_ttl_is_the_svid_lifetime(tmp_path: Path, ca: CA) -> None:
    with Agent(ca, tmp_path / "a.sock", [Entry(ID_WEB)], ttl=timedelta(minutes=5)) as agent:
        (svid,) = agent.current
    lifetime = svid.not_after - svid.cert.not_valid_before_utc
    assert lifetime <= timedelta(minutes=5) + timedelta(minutes=5, seconds=5)  # + backdate
