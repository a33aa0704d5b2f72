"""A throw-away PKI for tests of mutual TLS (Mosquitto, ETSI 014).

``make_pki(tmp_path, ["alice", "sae-a"])`` writes a CA, a server certificate
for 127.0.0.1/localhost and one client certificate per name (the name is the
certificate's CN, which Mosquitto's ``use_identity_as_username`` and the ETSI
014 server take as the identity).  Keys are 0600 files; everything is PEM.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    ca_key: Path
    server: CertPair
    clients: dict[str, CertPair] = field(default_factory=dict)

    def client(self, name: str) -> CertPair:
        return self.clients[name]


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    path.chmod(0o600)


def _issue(
    directory: Path,
    stem: str,
    cn: str,
    issuer: x509.Name,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    server: bool,
) -> CertPair:
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            critical=False,
        )
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    pair = CertPair(directory / f"{stem}.crt", directory / f"{stem}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(pair.key, key)
    return pair


def make_pki(directory: Path, clients: list[str], *, ca_name: str = "qnoded test CA") -> Pki:
    """A CA, a server certificate (localhost, 127.0.0.1) and one client certificate per CN."""
    directory.mkdir(parents=True, exist_ok=True)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name(ca_name))
        .issuer_name(_name(ca_name))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=2))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA256())
    )
    stem = ca_name.replace(" ", "-")
    ca_cert = directory / f"{stem}.crt"
    ca_cert.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    ca_key_path = directory / f"{stem}.key"
    _write_key(ca_key_path, ca_key)
    server = _issue(directory, "server", "localhost", ca.subject, ca_key, server=True)
    issued = {
        name: _issue(directory, f"client-{name}", name, ca.subject, ca_key, server=False)
        for name in clients
    }
    return Pki(ca_cert=ca_cert, ca_key=ca_key_path, server=server, clients=issued)
