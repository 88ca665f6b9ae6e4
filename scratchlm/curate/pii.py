"""PII: e-mail addresses and public IP addresses are replaced by placeholders."""

from __future__ import annotations

import ipaddress
import re

EMAIL = re.compile(
    r"\b[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+(?:\.[A-Za-z0-9!#$%&'*+/=?^_`{|}~-]+)*"
    r"@(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?\.)+[A-Za-z]{2,}\b"
)
_OCTET = r"(?:25[0-5]|2[0-4]\d|1\d\d|[1-9]?\d)"
# Not part of a longer dotted number (a version such as 1.2.3.4.5), but a sentence may end after it.
IPV4 = re.compile(rf"(?<!\d)(?<!\d\.)(?:{_OCTET}\.){{3}}{_OCTET}(?!\d)(?!\.\d)")
IPV6 = re.compile(r"(?<![\w:])(?:[0-9A-Fa-f]{1,4}:){7}[0-9A-Fa-f]{1,4}(?![\w:])")


def scrub(text: str, email_placeholder: str, ip_placeholder: str) -> tuple[str, int, int]:
    """The text with PII replaced, and how many e-mail and IP addresses were replaced.

    Only globally routable IPs count as PII (as in FineWeb): 127.0.0.1 or 192.168.0.1 name no one.
    """
    text, emails = EMAIL.subn(email_placeholder, text)
    ips = 0

    def replace_ip(m: re.Match[str]) -> str:
        nonlocal ips
        if not ipaddress.ip_address(m.group(0)).is_global:
            return m.group(0)
        ips += 1
        return ip_placeholder

    text = IPV4.sub(replace_ip, text)
    text = IPV6.sub(replace_ip, text)
    return text, emails, ips
