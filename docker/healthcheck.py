#!/usr/bin/env python3
"""Container health probe of the syncbus image (its HEALTHCHECK and compose's).

    syncbus-healthcheck                    # a worker: GET /healthz on its metrics.port
    syncbus-healthcheck URL [--ca FILE]    # anything else: GET URL (https: trust FILE)

Exit 0 when healthy, 1 when not, with one line saying why. Without a URL the config
named by $SYNCBUS_CONFIG (default /etc/syncbus/sync.yaml) is read: when it sets no
``metrics.port`` (or port 0, "any free port"), the worker has no endpoint to ask and
the probe passes.
"""

from __future__ import annotations

import argparse
import os
import ssl
import sys
import urllib.error
import urllib.request

#: The config file of the image's default command.
DEFAULT_CONFIG = "/etc/syncbus/sync.yaml"
#: Seconds one probe may take (below the HEALTHCHECK --timeout).
TIMEOUT = 4.0
#: Exit codes, as Docker reads them.
HEALTHY, UNHEALTHY = 0, 1


def worker_url(config_path: str) -> str | None:
    """The worker's ``/healthz`` URL, or None when its config opens no port.

    Raises:
        ConfigError: the config cannot be read or is invalid.
    """
    from bus.config.load import load_config

    metrics = load_config(config_path).config.metrics
    if not metrics.port:
        return None
    host = "127.0.0.1" if metrics.host in ("", "0.0.0.0") else metrics.host
    host = "::1" if host == "::" else host
    return f"http://{f'[{host}]' if ':' in host else host}:{metrics.port}/healthz"


def probe(url: str, ca_file: str | None = None) -> tuple[bool, str]:
    """GET ``url``: (answered 2xx, one line for the log)."""
    context = ssl.create_default_context(cafile=ca_file) if url.startswith("https:") else None
    try:
        with urllib.request.urlopen(url, timeout=TIMEOUT, context=context) as response:
            return True, f"{url}: {response.status}"
    except urllib.error.HTTPError as exc:
        body = exc.read(300).decode("utf-8", "replace").strip()
        return False, f"{url}: HTTP {exc.code} {body}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return False, f"{url}: {reason}"


def main(argv: list[str] | None = None) -> int:
    """Probe once; return the exit code."""
    parser = argparse.ArgumentParser(prog="syncbus-healthcheck", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("url", nargs="?", help="URL to GET instead of the worker's /healthz")
    parser.add_argument("--ca", help="CA bundle to trust for an https URL")
    args = parser.parse_args(argv)
    url = args.url
    if url is None:
        from connectors.base import ConfigError

        config = os.environ.get("SYNCBUS_CONFIG") or DEFAULT_CONFIG
        try:
            url = worker_url(config)
        except ConfigError as exc:
            print(exc.message, *exc.problems, sep="\n  ")
            return UNHEALTHY
        if url is None:
            print(f"{config}: no metrics.port, no /healthz to ask")
            return HEALTHY
    ok, line = probe(url, args.ca)
    print(line)
    return HEALTHY if ok else UNHEALTHY


if __name__ == "__main__":
    sys.exit(main())
