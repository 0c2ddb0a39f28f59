"""The connection and security options every dev tool takes, as ``serve`` does.

``--bootstrap-servers`` and the SASL/SSL settings, each also read from its
``STREAMLSTM_<NAME>`` variable; they pass through to every client a tool
starts. The password is never printed (argparse shows no defaults here).
"""

from __future__ import annotations

import argparse
import os
from typing import Any

from streamlstm.consumers.kafka.clients import client_options

__all__ = ["SECURITY_SETTINGS", "add_connection_arguments", "connection_options"]

#: Settings passed through to aiokafka, by the names ``serve`` uses for them.
SECURITY_SETTINGS = (
    "security_protocol",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
    "ssl_cafile",
    "ssl_certfile",
    "ssl_keyfile",
)


def add_connection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--bootstrap-servers",
        default=os.environ.get("STREAMLSTM_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
        help="[env STREAMLSTM_BOOTSTRAP_SERVERS] (default 127.0.0.1:9092)",
    )
    for name in SECURITY_SETTINGS:
        env = f"STREAMLSTM_{name.upper()}"
        parser.add_argument(
            "--" + name.replace("_", "-"),
            default=os.environ.get(env),
            metavar=name.split("_")[-1].upper(),
            help=f"[env {env}] as for serve",
        )


def connection_options(
    args: argparse.Namespace, client_id: str = "streamlstm-tool"
) -> dict[str, Any]:
    """aiokafka client options from the parsed arguments."""
    security = {name: getattr(args, name) for name in SECURITY_SETTINGS if getattr(args, name)}
    return client_options(args.bootstrap_servers, client_id=client_id, **security)
