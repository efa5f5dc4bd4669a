"""OpenSSL calls that Python's ssl module does not expose, reached through ctypes.

Why this exists:
- Half-close. `SSLSocket.unwrap()` calls `SSL_shutdown` twice: the second call reads
  from the socket and, when the peer's application data is already there, fails with
  APPLICATION_DATA_AFTER_CLOSE_NOTIFY and loses that record (seen here, OpenSSL 3.0).
  A proxy that carries one side's EOF through while the other side keeps talking must
  send close_notify once and keep reading; only a single `SSL_shutdown` call does that.
- Memory. `SSL_MODE_RELEASE_BUFFERS` lets OpenSSL free a connection's 16 KiB+ read and
  write buffers while it is idle, which is most of a held connection's cost.
- Memory, again. After the handshake OpenSSL keeps the peer's parsed intermediates for
  the connection's life (in the verified chain and in the session's peer chain), ~5.5 KiB
  each for an ECDSA one, though nothing reads them once the peer is authenticated.
- kTLS state. Whether the kernel took over TX or RX is a property of the socket BIO.
- A server-side session cache. Resuming from a stateless ticket decodes the whole session
  again, the client's certificate with it, and OpenSSL 3.0 decodes its public key through
  a decoder search that costs ~1.5 M instructions, twice per resumption (callgrind): more
  than half of a resumed handshake. A session kept in memory resumes without decoding.

How: the `SSL *` and `SSL_CTX *` live right after the object header in CPython's
`PySSLSocket` and `PySSLContext`. Reading them is only trusted after checks that cannot
crash: the word before `SSL *` must be the address of the socket's own weakref (which
CPython reuses), and `SSL_get_SSL_CTX(ssl)` must equal the context's pointer. Symbols are
resolved through the `_ssl` extension itself, so they are the very libssl it links. When
any check fails, `available()` is False and callers fall back (see engine.py);
SIDECAR_NO_OPENSSL_REACH=1 forces that fallback.
"""

from __future__ import annotations

import _ssl
import contextlib
import ctypes
import os
import socket
import ssl
import struct
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any

from sidecar.endpoint import DONE, WANT_READ, WANT_WRITE

_HEADER = object.__basicsize__  # ob_refcnt + ob_type: 16 on a default 64-bit build
_PTR = ctypes.sizeof(ctypes.c_void_p)
SSL_CTRL_MODE = 33
SSL_MODE_RELEASE_BUFFERS = 0x10
SSL_CTRL_SET_READ_AHEAD = 41
SSL_CTRL_SET_MAX_CERT_LIST = 51
SSL_CTRL_SET_TLSEXT_TICKET_KEYS = 59
SSL_CTRL_SET_SESS_CACHE_SIZE = 42
SSL_CTRL_SET_SESS_CACHE_MODE = 44
SSL_SESS_CACHE_SERVER = 0x2
SSL_SENT_SHUTDOWN = 1
TICKET_KEYS_LEN = 80  # OpenSSL 3: 16-byte key name + 32-byte HMAC key + 32-byte AES key
SSL_ERROR_WANT_READ = 2
SSL_ERROR_WANT_WRITE = 3
BIO_CTRL_GET_KTLS_SEND = 73
BIO_CTRL_GET_KTLS_RECV = 76


def _load() -> Any:
    # Free-threaded builds have a different object header; do not guess there.
    if hasattr(sys, "_is_gil_enabled") and not sys._is_gil_enabled():
        return None
    try:
        lib = ctypes.CDLL(_ssl.__file__)
        fns = {
            "SSL_shutdown": ([ctypes.c_void_p], ctypes.c_int),
            "SSL_get_SSL_CTX": ([ctypes.c_void_p], ctypes.c_void_p),
            "SSL_CTX_ctrl": (
                [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
                ctypes.c_long,
            ),
            "SSL_get_error": ([ctypes.c_void_p, ctypes.c_int], ctypes.c_int),
            "ERR_clear_error": ([], None),
            "SSL_set_num_tickets": ([ctypes.c_void_p, ctypes.c_size_t], ctypes.c_int),
            "SSL_CTX_set_session_id_context": (
                [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_uint], ctypes.c_int),
            "SSL_CTX_flush_sessions": ([ctypes.c_void_p, ctypes.c_long], None),
            "SSL_get_shutdown": ([ctypes.c_void_p], ctypes.c_int),
            "SSL_set_shutdown": ([ctypes.c_void_p, ctypes.c_int], None),
            "SSL_get_session": ([ctypes.c_void_p], ctypes.c_void_p),
            "SSL_SESSION_get_timeout": ([ctypes.c_void_p], ctypes.c_long),
            "SSL_SESSION_set_timeout": ([ctypes.c_void_p, ctypes.c_long], ctypes.c_long),
            "SSL_get0_verified_chain": ([ctypes.c_void_p], ctypes.c_void_p),
            "SSL_get_peer_cert_chain": ([ctypes.c_void_p], ctypes.c_void_p),
            "OPENSSL_sk_num": ([ctypes.c_void_p], ctypes.c_int),
            "OPENSSL_sk_pop": ([ctypes.c_void_p], ctypes.c_void_p),
            "X509_free": ([ctypes.c_void_p], None),
            "SSL_CTX_remove_session": ([ctypes.c_void_p, ctypes.c_void_p], ctypes.c_int),
            "SSL_CTX_set_verify_depth": ([ctypes.c_void_p, ctypes.c_int], None),
            "SSL_set_msg_callback": ([ctypes.c_void_p, ctypes.c_void_p], None),
            "SSL_get_wbio": ([ctypes.c_void_p], ctypes.c_void_p),
            "SSL_get_rbio": ([ctypes.c_void_p], ctypes.c_void_p),
            "SSL_get_servername": ([ctypes.c_void_p, ctypes.c_int], ctypes.c_char_p),
            "BIO_ctrl": (
                [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p],
                ctypes.c_long,
            ),
        }
        for name, (args, res) in fns.items():
            fn = getattr(lib, name)
            fn.argtypes = args
            fn.restype = res
        return lib
    except (OSError, AttributeError):
        return None


# Set to 1, this forces the fallback that runs where the reach is unavailable (a future
# CPython, a free-threaded build), so that mode can be run and tested anywhere.
FORCE_FALLBACK_ENV = "SIDECAR_NO_OPENSSL_REACH"
_lib = None if os.environ.get(FORCE_FALLBACK_ENV) == "1" else _load()


def _word(address: int) -> int | None:
    return ctypes.c_void_p.from_address(address).value


def context_pointer(ctx: ssl.SSLContext) -> int | None:
    if _lib is None:
        return None
    return _word(id(ctx) + _HEADER)


def ssl_pointer(sock: ssl.SSLSocket) -> int | None:
    """The `SSL *` of a live SSLSocket, or None when it cannot be read safely."""
    return connection_pointer(getattr(sock, "_sslobj", None), sock, sock.context)


def connection_pointer(obj: Any, sock: socket.socket, ctx: ssl.SSLContext) -> int | None:
    """The `SSL *` of the C-level connection `obj` over `sock`, made by `ctx` (wrap), or
    None when it cannot be read safely."""
    if _lib is None or obj is None:
        return None
    if _word(id(obj) + _HEADER) != id(weakref.ref(sock)):
        return None
    ptr = _word(id(obj) + _HEADER + _PTR)
    if not ptr or _lib.SSL_get_SSL_CTX(ptr) != context_pointer(ctx):
        return None
    return ptr


# -- Python-level reach: private attributes of CPython's ssl objects ----------------------
# No ctypes here, but the same rule: the one module that knows the private names.

def wrap(ctx: ssl.SSLContext, sock: socket.socket, *, server_side: bool,
         server_name: str | None, session: ssl.SSLSession | None, owner: object,
         ) -> tuple[Any, socket.socket]:
    """A TLS connection over a connected socket: (the C-level `_ssl._SSLSocket`, the socket
    to keep). The C-level object is made as `SSLContext.wrap_socket` makes it, without
    the `ssl.SSLSocket` around it: that wrapper asks the kernel four things it knows
    already (the socket's type, its address, its peer, and sets non-blocking again) and
    costs ~15 us of Python a connection. `owner` (weak-referenceable) is what the handshake
    hooks are handed as the connection (peerchain.py, engine.remember_server_name).
    Where the C-level constructor is gone, the public wrapper makes it."""
    make = getattr(ctx, "_wrap_socket", None)
    encode = ctx._encode_hostname  # type: ignore[attr-defined]
    hostname = encode(server_name) if server_name is not None else None
    if make is not None:
        try:
            return make(sock, server_side, hostname, owner=owner, session=session), sock
        except TypeError:
            pass  # another signature: the public way below
    wrapped = ctx.wrap_socket(sock, server_side=server_side, server_hostname=server_name,
                              do_handshake_on_connect=False, session=session)
    obj = inner(wrapped)
    obj.owner = owner
    return obj, wrapped


def inner(sock: ssl.SSLSocket) -> Any:
    """The C-level `_ssl._SSLSocket` behind an SSLSocket: the object its public methods
    call. Calling it directly saves a Python-level frame per chunk (engine.py)."""
    return sock._sslobj  # type: ignore[attr-defined]


def der_certificates(chain: Any) -> list[bytes]:
    """DER bytes of the `_ssl.Certificate`s `get_verified_chain` returns (None: [])."""
    return [c.public_bytes(_ssl.ENCODING_DER) for c in chain or ()]


MessageCallback = Callable[[Any, str, int, int, int, bytes], None]


def set_message_callback(ctx: ssl.SSLContext, callback: MessageCallback) -> bool:
    """Install a handshake-message hook on a context, through the C-level setter of
    `_msg_callback` (a private debugging hook, present from 3.8 to 3.13); False where it is
    gone. ssl.py's own property wraps the hook in a function that turns every argument
    into an enum, ~17k instructions a call, ~30 calls a handshake (measured with
    callgrind); the C setter hands over plain ints: (connection, "read" | "write", TLS
    version, content type, handshake message type, the message's bytes)."""
    raw = getattr(_ssl._SSLContext, "__dict__", {}).get("_msg_callback")
    if raw is None:
        return False
    raw.__set__(ctx, callback)
    return True


def shutdown_once(ptr: int) -> int | None:
    """Send close_notify and return at once; reading the peer's data stays possible.

    Returns the endpoint's codes: DONE when sent, WANT_WRITE / WANT_READ when the socket
    cannot take it yet, or None when OpenSSL refused (e.g. a connection still in a
    post-handshake step): the caller then ends the stream the TCP way.

    OpenSSL's error queue is per thread and shared by every connection: an error left
    there by this call would be reported by the next SSL call of *another* connection
    (seen: one peer's failed shutdown cut every live stream). So the queue is cleared
    before (for an honest SSL_get_error) and after.
    """
    assert _lib is not None
    _lib.ERR_clear_error()
    rc: int = _lib.SSL_shutdown(ptr)
    if rc >= 0:
        return DONE
    err: int = _lib.SSL_get_error(ptr, rc)
    _lib.ERR_clear_error()
    if err == SSL_ERROR_WANT_WRITE:
        return WANT_WRITE
    if err == SSL_ERROR_WANT_READ:
        return WANT_READ
    return None


def stop_message_callback(ptr: int) -> None:
    """Detach the handshake-debugging hook from an established connection.

    The context's `_msg_callback` (peerchain.py) is copied into every connection and
    then fires on every record; after the handshake it has nothing left to tell us.
    """
    assert _lib is not None
    _lib.SSL_set_msg_callback(ptr, None)


def release_buffers(ctx: ssl.SSLContext) -> bool:
    """Set SSL_MODE_RELEASE_BUFFERS on a context; True when it took effect."""
    ptr = context_pointer(ctx)
    if _lib is None or ptr is None or not _self_test_passed():
        return False
    mode = _lib.SSL_CTX_ctrl(ptr, SSL_CTRL_MODE, SSL_MODE_RELEASE_BUFFERS, None)
    return bool(mode & SSL_MODE_RELEASE_BUFFERS)


def no_new_tickets(ptr: int) -> None:
    """This connection sends no NewSessionTicket when its handshake ends."""
    assert _lib is not None
    _lib.SSL_set_num_tickets(ptr, 0)


def set_ticket_keys(ctx: ssl.SSLContext, keys: bytes) -> bool:
    """Give a server context our own ticket keys (instead of its random ones), so that
    workers sharing a port accept each other's tickets and rotation is ours to time."""
    ptr = context_pointer(ctx)
    if _lib is None or ptr is None or not _self_test_passed() or len(keys) != TICKET_KEYS_LEN:
        return False
    buf = ctypes.create_string_buffer(keys, TICKET_KEYS_LEN)
    return bool(_lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_TLSEXT_TICKET_KEYS, TICKET_KEYS_LEN, buf))


def server_session_cache(ctx: ssl.SSLContext, size: int) -> bool:
    """Keep resumable sessions in this process (TLS 1.3 stateful tickets: the ticket is
    only an ID). True when the cache is on.

    Python sets no session ID context, and OpenSSL never caches a session made with a
    client certificate without one (it could not tell which application it belongs to),
    so resumption would silently never happen. The caller sets OP_NO_TICKET, which in
    TLS 1.3 means "stateful tickets", not "no tickets".
    """
    ptr = context_pointer(ctx)
    if _lib is None or ptr is None or not _self_test_passed():
        return False
    sid = b"sidecar"
    if not _lib.SSL_CTX_set_session_id_context(ptr, sid, len(sid)):
        return False
    _lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_MODE, SSL_SESS_CACHE_SERVER, None)
    _lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_SESS_CACHE_SIZE, size, None)
    return True


def flush_sessions(ctx: ssl.SSLContext) -> None:
    """Forget every session in a context's server cache (a rotation epoch, a trust
    change): their peers fall back to a full handshake."""
    ptr = context_pointer(ctx)
    if _lib is not None and ptr is not None and _self_test_passed():
        _lib.SSL_CTX_flush_sessions(ptr, 0)  # 0: every session, expired or not


def keep_session(ptr: int) -> None:
    """Let the session outlive a connection that ends without our close_notify.

    OpenSSL drops a cached session when its connection is freed before close_notify was
    sent (a "bad" session, in case the close was a truncation attack on TLS 1.2). An idle
    timeout or a peer's reset ends an authenticated TLS 1.3 connection the same way; its
    session is as good as ever, and dropping it would make the peer's next connection a
    full handshake. Marking close_notify as sent changes nothing else: the socket is
    about to be closed."""
    assert _lib is not None
    _lib.SSL_set_shutdown(ptr, _lib.SSL_get_shutdown(ptr) | SSL_SENT_SHUTDOWN)


def forget_session(ptr: int) -> None:
    """Take this connection's session out of its context's server cache, if it is there
    (a peer refused after its handshake: its next connection proves itself in full)."""
    assert _lib is not None
    session = _lib.SSL_get_session(ptr)
    if session:
        _lib.SSL_CTX_remove_session(_lib.SSL_get_SSL_CTX(ptr), session)


def cap_session_lifetime(sock: ssl.SSLSocket, seconds: int) -> bool:
    """cap_session_life of `sock`'s connection; False when it cannot be reached."""
    ptr = ssl_pointer(sock)
    return ptr is not None and cap_session_life(ptr, seconds)


def cap_session_life(ptr: int, seconds: int) -> bool:
    """Let the session being made on the connection `ptr` (ssl_pointer) resume for
    `seconds` at most (a server, while the handshake reads the peer's certificates).
    False when it cannot be reached.

    OpenSSL declines a timed-out session, from its cache or a ticket, and makes a full
    handshake instead; a TLS 1.3 ticket also tells the client its lifetime (the session's
    timeout), and OpenSSL's client stops offering it after that."""
    if _lib is None or not _self_test_passed():
        return False
    session = _lib.SSL_get_session(ptr)
    if not session:
        return False
    # Never 0: OpenSSL 3.0 then fails the handshake with an internal error (seen here on a
    # peer whose certificate expired that second). A chain already expired is refused by
    # the verification that follows, and a resumption re-checks the chain's validity.
    seconds = max(seconds, 1)
    if seconds < _lib.SSL_SESSION_get_timeout(session):
        _lib.SSL_SESSION_set_timeout(session, seconds)
    return True


def drop_peer_chains(ptr: int) -> None:
    """Release the peer's certificate chains of an authenticated connection: the verified
    chain and the session's peer chain. The peer's leaf stays (the session holds it, and
    a resumption reads it), and so does everything the record layer uses.

    Only the stacks' elements go, with X509_free for the reference each held; the stacks
    stay with their owners. A certificate is freed once neither stack holds it. Seen
    here (OpenSSL 3.0.19): data both ways, a KeyUpdate, close_notify both ways and a
    later resumption all work after it; the server-side cache (openssl.py's
    server_session_cache) shares the session, so its entries shrink too.
    """
    assert _lib is not None
    for stack in (_lib.SSL_get0_verified_chain(ptr), _lib.SSL_get_peer_cert_chain(ptr)):
        if not stack:
            continue
        for _ in range(_lib.OPENSSL_sk_num(stack)):
            _lib.X509_free(_lib.OPENSSL_sk_pop(stack))


def bound_peer_chain(ctx: ssl.SSLContext, depth: int, max_bytes: int) -> bool:
    """Bound the chain a peer may make OpenSSL parse and walk: how many intermediates
    (Python sets no depth: OpenSSL's 100 applies) and how many bytes its Certificate
    message may hold (OpenSSL's default is 100 KiB)."""
    ptr = context_pointer(ctx)
    if _lib is None or ptr is None or not _self_test_passed():
        return False
    _lib.SSL_CTX_set_verify_depth(ptr, depth)
    _lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_MAX_CERT_LIST, max_bytes, None)
    return True


def read_ahead(ctx: ssl.SSLContext) -> bool:
    """Let OpenSSL read as much ciphertext as the socket has in one read(): without it,
    each record costs two reads (header, then body). The engine drains OpenSSL after every
    readable event, so nothing read ahead is left behind."""
    ptr = context_pointer(ctx)
    if _lib is None or ptr is None or not _self_test_passed():
        return False
    _lib.SSL_CTX_ctrl(ptr, SSL_CTRL_SET_READ_AHEAD, 1, None)
    return True


def ktls_state(ptr: int) -> tuple[bool, bool]:
    """(tx, rx): whether the kernel holds this connection's send / receive keys."""
    assert _lib is not None
    tx = _lib.BIO_ctrl(_lib.SSL_get_wbio(ptr), BIO_CTRL_GET_KTLS_SEND, 0, None)
    rx = _lib.BIO_ctrl(_lib.SSL_get_rbio(ptr), BIO_CTRL_GET_KTLS_RECV, 0, None)
    return tx > 0, rx > 0


_self_test: bool | None = None


def _self_test_passed() -> bool:
    """Prove the layout on a throwaway socket pair before trusting it with contexts."""
    global _self_test
    if _self_test is None:
        _self_test = _run_self_test()
    return _self_test


def _run_self_test() -> bool:
    import socket

    if _lib is None:
        return False
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    a, b = socket.socketpair()
    try:
        s = ctx.wrap_socket(a, do_handshake_on_connect=False, server_hostname="self-test")
        ok = ssl_pointer(s) is not None
        s.close()
        return ok
    finally:
        a.close()
        b.close()


def available() -> bool:
    return _self_test_passed()


# --- handshake parameters: key-exchange groups and signature algorithms ------------------
# Python's ssl sets neither (3.13 has no set_groups), so OpenSSL's defaults apply: groups
# ffdhe2048..ffdhe8192 among them, one of which costs a server ~130 ms of CPU for a single
# unauthenticated ClientHello. Constants from OpenSSL 3.0's <openssl/ssl.h>.
SSL_CTRL_SET_GROUPS_LIST = 92
SSL_CTRL_SET_SIGALGS_LIST = 98  # what we offer and accept for handshake signatures
SSL_CTRL_SET_CLIENT_SIGALGS_LIST = 102  # what a server asks of client certificates


def set_groups(ctx: ssl.SSLContext, groups: str) -> bool:
    """Set the key-exchange groups a context offers and accepts ("X25519:P-256"), both
    as client and as server. False when the layout is not trusted or OpenSSL refused a
    name; the context is then unchanged."""
    return _ctrl_string(ctx, SSL_CTRL_SET_GROUPS_LIST, groups)


def set_sigalgs(ctx: ssl.SSLContext, sigalgs: str) -> bool:
    """Set the signature algorithms a context signs with, accepts from its peer and asks
    of a client certificate ("ed25519:rsa_pss_rsae_sha256"). False as for set_groups."""
    return (_ctrl_string(ctx, SSL_CTRL_SET_SIGALGS_LIST, sigalgs)
            and _ctrl_string(ctx, SSL_CTRL_SET_CLIENT_SIGALGS_LIST, sigalgs))


def _ctrl_string(ctx: ssl.SSLContext, cmd: int, value: str) -> bool:
    ptr = context_pointer(ctx)
    if _lib is None or ptr is None or not _self_test_passed():
        return False
    # A refused name leaves an error on the thread's queue, which the next SSL call of
    # any connection would report as its own (see shutdown_once).
    _lib.ERR_clear_error()
    ok = bool(_lib.SSL_CTX_ctrl(ptr, cmd, 0, value.encode("ascii")))
    _lib.ERR_clear_error()
    return ok


# --- Client sessions: is there a ticket worth asking Python for? ----------------------------
# CPython 3.13.0's `session` getter leaks a copy of the session on every call (gh-116810),
# so the engine asks OpenSSL first; SSL_get_session borrows, it copies nothing.


def _declare_has_ticket() -> None:
    if _lib is None:
        return
    fn = _lib.SSL_SESSION_has_ticket
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int


try:
    _declare_has_ticket()
except AttributeError:  # an OpenSSL without it is older than any Python 3.13 accepts
    _lib = None


def has_ticket(ptr: int) -> bool:
    """Does this connection's current session carry a ticket (TLS 1.3: one has arrived)?"""
    assert _lib is not None
    session = _lib.SSL_get_session(ptr)
    return bool(session) and bool(_lib.SSL_SESSION_has_ticket(session))


# --- Anything left inside OpenSSL to read? (engine.read_into / read_some, per short record) -
# With read-ahead OpenSSL may have taken several records off the socket in one read(): the
# kernel then shows nothing readable, and only SSL_has_pending knows (SSL_pending counts
# decrypted bytes of the current record only). The ctypes function itself is exported,
# with no Python wrapper, since the pump asks it once per request; it is None without the
# reach, and must be given only a pointer from ssl_pointer.


def _declare_has_pending() -> Callable[[int], int] | None:
    if _lib is None:
        return None
    # Through PyDLL: the GIL stays held (a few field reads need no release and re-take).
    fn = ctypes.PyDLL(_ssl.__file__).SSL_has_pending
    fn.argtypes = [ctypes.c_void_p]
    fn.restype = ctypes.c_int
    fn_: Callable[[int], int] = fn
    return fn_


try:
    has_pending = _declare_has_pending()
except (OSError, AttributeError):  # older than any OpenSSL Python 3.13 accepts
    has_pending = None


# --- The SNI a client sent (a server's view) ----------------------------------------------
# Python shows it only to an sni_callback, a Python call in every handshake of every
# listener; the PROXY header (proxy/inbound.py) asks for it only where it is sent.
TLSEXT_NAMETYPE_HOST_NAME = 0


def server_name(ptr: int) -> str | None:
    """The host name of the ClientHello's server_name extension, or None."""
    assert _lib is not None
    name: bytes | None = _lib.SSL_get_servername(ptr, TLSEXT_NAMETYPE_HOST_NAME)
    return name.decode("utf-8", "replace") if name else None


# --- A close_notify, or a bare end of the TCP stream? ------------------------------------
BIO_CTRL_EOF = 2


def read_hit_eof(ptr: int) -> bool:
    """Did the socket under this connection return end-of-file to OpenSSL?

    With OP_IGNORE_UNEXPECTED_EOF (the in-memory session store sets it, so that a peer
    hanging up does not evict its session), OpenSSL reports a bare FIN exactly as it
    reports a close_notify. The socket BIO still knows: it marks EOF when a read returned
    0, and OpenSSL stops reading at a close_notify, before any such read."""
    assert _lib is not None
    return bool(_lib.BIO_ctrl(_lib.SSL_get_rbio(ptr), BIO_CTRL_EOF, 0, None))


# --- Holding a socket's incoming segments (the public close_notify, engine.py) -------------
# Not OpenSSL, but a raw pointer handed to the kernel: ctypes lives here only.


@contextlib.contextmanager
def incoming_held(sock: socket.socket) -> Iterator[None]:
    """While inside, the kernel drops the TCP segments that reach `sock`, before they are
    acknowledged or queued (a socket filter that accepts nothing), so the receive queue
    cannot grow; the peer sends them again after its retransmission timeout (~0.2 s on
    loopback), a delay paid only when a segment came in that instant. Where a filter
    cannot be attached, nothing is held."""
    try:
        sock.setsockopt(socket.SOL_SOCKET, _SO_ATTACH_FILTER, _DROP_ALL_PROG)
    except OSError:
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):  # ENOENT: an inner hold has detached it
            sock.setsockopt(socket.SOL_SOCKET, _SO_DETACH_FILTER, 0)


# Linux's classic BPF socket filter: one instruction, "return 0" (keep 0 bytes: drop).
_SO_ATTACH_FILTER, _SO_DETACH_FILTER = 26, 27
_DROP_ALL = ctypes.create_string_buffer(struct.pack("HBBI", 0x06, 0, 0, 0))  # BPF_RET|BPF_K
_DROP_ALL_PROG = struct.pack("HP", 1, ctypes.addressof(_DROP_ALL))  # struct sock_fprog


# --- ALPN on http listeners: http/1.1, and a clear refusal of an h2-only client ----------
# Python's set_alpn_protocols works per context and, when nothing matches, lets the
# handshake go on without a protocol; an http listener must instead refuse a client that
# offers only protocols it does not speak (h2: RFC 7301 3.2's no_application_protocol
# alert), and tcp listeners, which share the context, must see no ALPN at all (as today).
# So the context gets OpenSSL's selection callback, and each connection of an http
# listener a mark in its ex_data: unmarked connections get SSL_TLSEXT_ERR_NOACK, which
# OpenSSL treats exactly as if there were no callback.
SSL_TLSEXT_ERR_OK = 0
SSL_TLSEXT_ERR_ALERT_FATAL = 2
SSL_TLSEXT_ERR_NOACK = 3
CRYPTO_EX_INDEX_SSL = 0
HTTP11 = b"http/1.1"
_ALPN_SELECT = ctypes.CFUNCTYPE(
    ctypes.c_int, ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p),
    ctypes.POINTER(ctypes.c_ubyte), ctypes.c_void_p, ctypes.c_uint, ctypes.c_void_p)
_http1_index: int | None = None


def _declare_alpn() -> int | None:
    if _lib is None:
        return None
    for name, args, res in (
        ("SSL_CTX_set_alpn_select_cb", [ctypes.c_void_p, _ALPN_SELECT, ctypes.c_void_p], None),
        ("SSL_set_ex_data", [ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p], ctypes.c_int),
        ("SSL_get_ex_data", [ctypes.c_void_p, ctypes.c_int], ctypes.c_void_p),
        ("CRYPTO_get_ex_new_index", [ctypes.c_int, ctypes.c_long, ctypes.c_void_p,
                                     ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p],
         ctypes.c_int),
    ):
        fn = getattr(_lib, name)
        fn.argtypes = args
        fn.restype = res
    index: int = _lib.CRYPTO_get_ex_new_index(CRYPTO_EX_INDEX_SSL, 0, None, None, None, None)
    return index if index >= 0 else None


def _select_http1(ssl_ptr: int | None, out: Any, outlen: Any, offered: int | None,
                  length: int, _arg: int | None) -> int:
    """OpenSSL's ALPN selection callback (runs inside the handshake, GIL taken by ctypes).
    Never raises: an exception here would print and return 0, which accepts nothing."""
    try:
        assert _lib is not None
        if not _lib.SSL_get_ex_data(ssl_ptr, _http1_index):
            return SSL_TLSEXT_ERR_NOACK  # a tcp listener's connection: no ALPN, as before
        wire = ctypes.string_at(offered, length) if offered else b""
        at = 0
        while at < len(wire):
            size = wire[at]
            if wire[at + 1:at + 1 + size] == HTTP11:
                assert offered is not None
                out[0] = offered + at + 1  # points into the client's list, as OpenSSL's own
                outlen[0] = size
                return SSL_TLSEXT_ERR_OK
            at += 1 + size
        return SSL_TLSEXT_ERR_ALERT_FATAL  # offered ALPN, but not http/1.1: refused
    except Exception:
        return SSL_TLSEXT_ERR_NOACK


_select_http1_cb = _ALPN_SELECT(_select_http1)  # kept alive for the process's life


def offer_http1(ctx: ssl.SSLContext) -> bool:
    """Install the selection callback on a server context; its http connections then
    agree on http/1.1 (`mark_http1`), refuse a client without it, and the others see no
    ALPN. False where the reach is unavailable (nothing is installed)."""
    global _http1_index
    ptr = context_pointer(ctx)
    if _lib is None or ptr is None or not _self_test_passed():
        return False
    if _http1_index is None:
        _http1_index = _declare_alpn()
        if _http1_index is None:
            return False
    _lib.SSL_CTX_set_alpn_select_cb(ptr, _select_http1_cb, None)
    return True


def mark_http1(ptr: int) -> None:
    """This connection belongs to an http listener (see offer_http1)."""
    if _lib is not None and _http1_index is not None:
        _lib.SSL_set_ex_data(ptr, _http1_index, 1)
