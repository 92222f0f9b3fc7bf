"""``syncbus emulate …``: local emulators of the external systems, for tests, demos and
development sandboxes. Each serves until Ctrl-C."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from bus.cli.common import Group

__all__ = ["emulate"]

emulate = typer.Typer(
    help=(
        "Run a local emulator of an external system (a sandbox for development and tests).\n\n"
        "  syncbus emulate dataverse --https --seed 500 --store .syncbus/crm.sqlite\n\n"
        "  syncbus emulate bc --https --seed 200 --store .syncbus/erp.sqlite"
    ),
    no_args_is_help=True,
    cls=Group,
)

Port = Annotated[int, typer.Option(help="TCP port to listen on.")]
Host = Annotated[str, typer.Option(help="Interface to bind.")]
Https = Annotated[bool, typer.Option("--https", help="Serve HTTPS with a generated local CA.")]
CertDir = Annotated[Path, typer.Option(help="Where the CA (ca.pem) and server certificate go.")]
Seed = Annotated[int, typer.Option(help="Load N realistic records at start (0: empty).")]
Store = Annotated[Path | None, typer.Option(help="SQLite file keeping the data across restarts.")]


@emulate.command("dataverse")
def dataverse(port: Port = 8701, host: Host = "127.0.0.1", https: Https = False,
              cert_dir: CertDir = Path(".syncbus/certs"), seed: Seed = 0,
              store: Store = None) -> None:
    """Emulate a Dataverse (Dynamics 365) organisation and its Entra ID token endpoint.

    Its token endpoint accepts, by default:

    tenant 00000000-0000-0000-0000-0000000000aa

    client id 00000000-0000-0000-0000-0000000000c1

    client secret syncbus-emulator-secret

    The authority is https://127.0.0.1:PORT/TENANT; MSAL needs --https (trust
    CERT_DIR/ca.pem). See docs/dataverse.md.

    Example: syncbus emulate dataverse --https --port 8701 --seed 500 --store .syncbus/crm.sqlite
    """
    from connectors.dataverse.emulator import serve

    serve(host=host, port=port, https=https, cert_dir=cert_dir, seed=seed, store=store,
          echo=typer.echo)


@emulate.command("bc")
def business_central(port: Port = 8702, host: Host = "127.0.0.1", https: Https = False,
                     cert_dir: CertDir = Path(".syncbus/certs"), seed: Seed = 0,
                     store: Store = None) -> None:
    """Emulate a Business Central environment and its Entra ID token endpoint.

    It serves tenant 00000000-0000-0000-0000-0000000000aa, environment production
    and company "CRONUS USA, Inc."; its token endpoint accepts:

    client id 00000000-0000-0000-0000-0000000000c1

    client secret syncbus-emulator-secret

    The API is https://127.0.0.1:PORT/v2.0/TENANT/production/api/v2.0/ and the
    authority host is https://127.0.0.1:PORT; MSAL needs --https (trust
    CERT_DIR/ca.pem). See docs/business-central.md.

    Example: syncbus emulate bc --https --port 8702 --seed 200 --store .syncbus/erp.sqlite
    """
    from connectors.business_central.emulator import serve

    serve(host=host, port=port, https=https, cert_dir=cert_dir, seed=seed, store=store,
          echo=typer.echo)
