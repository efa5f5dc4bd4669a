"""Who `sidecar diagnose` is when it dials: the certificate it presents and the CAs it
trusts, and where they come from.

- `--cert/--key/--bundle`: files, as always; without them, a plain TLS client.
- `--workload-api ADDR [--spiffe-id ID]`: the identity the agent hands out, checked as
  `run` checks it, presented and trusted as the sidecar's outbound side does (every
  bundle, ours and the federated ones, and the CRLs; contexts.present_and_trust).
- `-c CONFIG`: the identity the config names: its agent as above, or its files (our
  bundle, each federated bundle, each CRL).

The files are read as they are, not through `load_identity`: a broken SVID must still be
presented, so that diagnose shows what the server makes of it (and names what is wrong).
"""

from __future__ import annotations

import argparse
import ssl
from dataclasses import dataclass

from cryptography import x509

from sidecar import svid
from sidecar.identity import Identity
from sidecar.tls import contexts
from sidecar.tools import identity_source
from sidecar.tools.inspect.pem import PemContents, read_pem
from sidecar.tools.inspect.report import BundleFile


@dataclass(frozen=True, slots=True)
class Seat:
    source: str  # where our identity and trust come from, in words; "" for neither
    cert: str | None = None  # PEM: leaf, then intermediates (and maybe the key)
    key: str | None = None
    bundle: str | None = None  # our trust domain's CAs
    federated: tuple[str, ...] = ()  # other trust domains' CAs
    crls: tuple[str, ...] = ()
    identity: Identity | None = None  # from an agent: all of the above in one snapshot
    trust_label: str = "--bundle"  # what the server is verified against, in words

    @property
    def presents(self) -> bool:
        return self.identity is not None or bool(self.cert)

    @property
    def verifies(self) -> bool:
        return self.identity is not None or bool(self.bundle)

    def load(self, ctx: ssl.SSLContext) -> None:
        """What we present and whom we trust, into a context that offers the sidecar's
        handshake already (contexts.client)."""
        if self.identity is not None:
            contexts.present_and_trust(ctx, self.identity)
            return
        for path in (self.bundle, *self.federated):
            if path:
                ctx.load_verify_locations(cafile=path)
        ctx.verify_mode = ssl.CERT_REQUIRED if self.bundle else ssl.CERT_NONE
        for path in self.crls:
            ctx.load_verify_locations(cafile=path)
            # As the sidecar: a revoked server, or one whose CA has no CRL here, is refused.
            ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF
        if self.cert:
            ctx.load_cert_chain(self.cert, self.key)

    def chain(self) -> PemContents | None:
        """Our chain as `sidecar inspect` reads it; None when it cannot be read."""
        if self.identity is not None:
            certs = (self.identity.leaf, *self.identity.intermediates)
            return PemContents(certs, 0, (), (), len(self.identity.chain_pem))
        data = _read(self.cert)
        return None if data is None else read_pem(data)

    def own_bundle(self) -> BundleFile | None:
        """Our trust domain's CAs, which our own chain must lead to."""
        if self.identity is not None:
            own = self.identity.own_bundle
            return BundleFile(f"the bundle of {own.trust_domain}", own.cas)
        data = _read(self.bundle)
        return None if data is None or self.bundle is None else \
            BundleFile(self.bundle, read_pem(data).certs)

    def known_intermediates(self) -> list[x509.Name]:
        """The intermediates of our own chain, by subject."""
        contents = self.chain()
        return [c.subject for c in contents.certs[1:]] if contents else []

    def trusted_names(self) -> list[x509.Name]:
        """The subjects of every CA we trust, federated ones included."""
        if self.identity is not None:
            return [ca.subject for b in self.identity.bundles.values() for ca in b.cas]
        return [c.subject for path in (self.bundle, *self.federated)
                if (data := _read(path)) is not None for c in read_pem(data).certs]

    def spiffe_id(self) -> str | None:
        """Our SPIFFE ID, when our leaf can be read and names one."""
        if self.identity is not None:
            return str(self.identity.spiffe_id)
        contents = self.chain()
        if not contents or not contents.certs:
            return None
        try:
            return str(svid.spiffe_id_of(contents.certs[0]))
        except svid.SvidError:
            return None


def _read(path: str | None) -> bytes | None:
    if not path:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:
        return None


def seat_of(args: argparse.Namespace) -> Seat:
    """Who to be, from the flags. SourceError when the agent or the config cannot say."""
    source = identity_source.from_args(args)
    if isinstance(source, identity_source.AgentSource):
        return Seat(str(source), identity=identity_source.identity_of(source),
                    trust_label=f"the bundles from {source}")
    if isinstance(source, identity_source.FileSource):
        return Seat(str(source), str(source.cert), str(source.key), str(source.bundle),
                    tuple(map(str, source.federated.values())), tuple(map(str, source.crls)),
                    trust_label=f"the bundles of {source.config}")
    given = args.cert or args.key or args.bundle
    return Seat("--cert/--key/--bundle" if given else "", args.cert, args.key, args.bundle)
