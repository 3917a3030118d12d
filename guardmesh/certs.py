"""A local certificate authority for the mesh (``guardmesh certs``, ``make certs``), with ``cryptography``.

Writes into one folder: the CA (``ca.pem``, ``ca-key.pem``); one server certificate per service
(``<service>.pem``, ``<service>-key.pem``; SANs localhost, 127.0.0.1, ::1, the service name and any extra
host); one client certificate per role (``client-<role>.pem``, common name ``client-<role>``); one random
role token per role (``tokens/<role>.token``, mode 0600) and ``roles.toml``, which maps token SHA-256 digests
and certificate common names to roles. Keys are ECDSA P-256; private key files are mode 0600.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from guardmesh.security import ROLES, token_digest

VALID_DAYS = 365


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write(path: Path, data: bytes, private: bool = False) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
    os.replace(tmp, path)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _name(cn: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "guardmesh"), x509.NameAttribute(NameOID.COMMON_NAME, cn)]
    )


def _issue(
    cn: str,
    ca_key: ec.EllipticCurvePrivateKey,
    ca_name: x509.Name,
    usages: list[x509.ObjectIdentifier],
    sans: list[x509.GeneralName],
) -> tuple[bytes, bytes]:
    key = _key()
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(cn))
        .issuer_name(ca_name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    return cert.public_bytes(serialization.Encoding.PEM), _pem_key(key)


def generate(
    out: Path,
    services: Iterable[str],
    *,
    hosts: Iterable[str] = (),
    extra_tokens: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """Create the CA, the service and role certificates, the tokens and ``roles.toml`` in ``out``.

    ``extra_tokens`` maps additional principals to roles (e.g. ``{"trainer-b": "trainer"}``), each with its own
    token. Returns every principal's token (also written under ``tokens/``).
    """
    out.mkdir(parents=True, exist_ok=True)
    ca_key = _key()
    ca_name = _name("guardmesh local CA")
    now = dt.datetime.now(dt.UTC)
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
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
    _write(out / "ca.pem", ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(out / "ca-key.pem", _pem_key(ca_key), private=True)
    names = ["localhost", *hosts]
    ips = [ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    for service in services:
        sans: list[x509.GeneralName] = [x509.DNSName(h) for h in dict.fromkeys([*names, service])]
        sans += [x509.IPAddress(ip) for ip in ips]
        cert, key = _issue(
            service, ca_key, ca_name, [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH], sans
        )
        _write(out / f"{service}.pem", cert)
        _write(out / f"{service}-key.pem", key, private=True)
    for role in ROLES:
        cert, key = _issue(f"client-{role}", ca_key, ca_name, [ExtendedKeyUsageOID.CLIENT_AUTH], [])
        _write(out / f"client-{role}.pem", cert)
        _write(out / f"client-{role}-key.pem", key, private=True)
    principals = {role: role for role in ROLES} | dict(extra_tokens or {})
    tokens = {}
    lines = ["# guardmesh roles: SHA-256 digests of role tokens and client certificate common names.", "[tokens]"]
    for principal, role in principals.items():
        if role not in ROLES:
            raise ValueError(f"extra_tokens[{principal}]: unknown role '{role}' (roles: {', '.join(ROLES)})")
        token = secrets.token_urlsafe(32)
        tokens[principal] = token
        _write(out / "tokens" / f"{principal}.token", token.encode() + b"\n", private=True)
        lines.append(f'"{token_digest(token)}" = {{ role = "{role}", principal = "{principal}" }}')
    lines.append("[certificates]")
    lines += [f'"client-{role}" = "{role}"' for role in ROLES]
    _write(out / "roles.toml", ("\n".join(lines) + "\n").encode())
    return tokens
