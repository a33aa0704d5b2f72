"""The ``qnoded`` command: run, check-config, drivers, demo, plan, monitor.

Exit codes: 0 success, 1 runtime failure, 2 bad configuration or usage.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import structlog

from qnoded import __version__
from qnoded.config import ConfigError, load_config
from qnoded.devices import DeviceManager
from qnoded.logs import configure_logging
from qnoded.registry import RegistryError, discover

EXIT_RUNTIME = 1
EXIT_CONFIG = 2
# A node that has not stopped this long after SIGTERM is stuck; systemd's
# TimeoutStopSec is the backstop, this is ours.
SHUTDOWN_GRACE_S = 4.0


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="qnoded", description="Control daemon for QKD nodes.")
    p.add_argument("--version", action="version", version=f"qnoded {__version__}")
    p.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    p.add_argument("--log-format", default="auto", choices=["auto", "json", "console"])
    sub = p.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="run one node")
    run.add_argument("--config", required=True, help="node TOML file")
    chk = sub.add_parser("check-config", help="validate a node config and exit")
    chk.add_argument("file")
    sub.add_parser("drivers", help="list installed drivers and where they come from")
    psk = sub.add_parser("psk", help="pre-shared key for authenticating the peer channel")
    psk_sub = psk.add_subparsers(dest="psk_command", required=True)
    gen = psk_sub.add_parser("generate", help="write a new random PSK file (mode 0600)")
    gen.add_argument("file")
    gen.add_argument(
        "--bytes", type=int, default=1 << 19, help="size (default 512 KiB: fits a credential)"
    )
    demo = sub.add_parser("demo", help="two simulated nodes making key over MQTT")
    from qnoded.demo import add_arguments

    add_arguments(demo)
    plan = sub.add_parser("plan", help="expected key rate versus distance for given hardware")
    from qnoded.plan import add_arguments as add_plan_arguments

    add_plan_arguments(plan)
    monitor = sub.add_parser("monitor", help="live dashboard of nodes' status, telemetry, alarms")
    from qnoded.monitor import add_arguments as add_monitor_arguments

    add_monitor_arguments(monitor)
    return p


async def _run(config_path: str) -> int:
    # Imported here, not at the top: `check-config` and `drivers` stay fast.
    from qnoded.audit import record_config
    from qnoded.auth import AuthError
    from qnoded.etsi014 import Etsi014Error
    from qnoded.node import run_node

    config = load_config(config_path)
    registry = discover()
    DeviceManager(config, registry).check()
    record_config(config, Path(config.state.directory), source=config_path)
    task = asyncio.current_task()
    assert task is not None
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, task.cancel)
    try:
        await run_node(config, registry)
    except AuthError as exc:
        # No pre-shared key, or the wrong one: nothing may start (fail closed).
        print(f"qnoded: authentication key error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except Etsi014Error as exc:
        # Its TLS files or addresses are wrong: a configuration error, not a crash.
        print(f"qnoded: [etsi014] {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except asyncio.CancelledError:
        structlog.get_logger("qnoded").info("stopped by signal")
        return 0
    return 0


def _psk_generate(file: str, nbytes: int) -> int:
    from qnoded.auth import AuthError, write_psk

    try:
        write_psk(Path(file), nbytes)
    except AuthError as exc:
        print(f"qnoded: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    # The bytes stay in the file: never on the terminal.
    print(
        f"wrote {nbytes} random bytes to {file} (mode 0600).\n"
        "Install the SAME file at both nodes, over a channel you trust (not the peer link),\n"
        "mode 0600, then either\n"
        "  - as /etc/qnoded/credentials/qnoded-psk (root-only), which the shipped unit loads\n"
        "    with LoadCredential=qnoded-psk:/etc/qnoded/credentials/qnoded-psk, or\n"
        '  - owned by the qnoded user, set [auth] psk_file = "/path/to/psk" in its config.\n'
        "Each node imports it into <state dir>/auth.db on first start; keep the file\n"
        "unchanged afterwards, and never copy or restore an auth.db between nodes."
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    fmt = {"auto": None, "json": True, "console": False}[args.log_format]
    configure_logging(args.log_level, json=fmt)
    log = structlog.get_logger("qnoded")
    try:
        if args.command == "check-config":
            config = load_config(args.file)
            DeviceManager(config, discover()).check()
            print(
                f"{args.file}: ok ({config.node.role}, {config.node.protocol}, "
                f"{len(config.devices)} devices)"
            )
            return 0
        if args.command == "drivers":
            for name, info in discover().items():
                print(f"{name:16} {info.kind!s:12} {info.target}  (from {info.distribution})")
            return 0
        if args.command == "psk":
            return _psk_generate(args.file, args.bytes)
        if args.command == "run":
            return asyncio.run(_run(args.config))
        if args.command == "demo":
            from qnoded.demo import run_demo

            return run_demo(args)
        if args.command == "plan":
            from qnoded.plan import run_plan

            return run_plan(args)
        if args.command == "monitor":
            from qnoded.monitor import monitor_command

            return monitor_command(args)
    except ConfigError as exc:
        print(f"qnoded: configuration error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except RegistryError as exc:
        print(f"qnoded: driver registry error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except KeyboardInterrupt:
        return 0
    except Exception as exc:
        log.exception("fatal", error=str(exc))
        return EXIT_RUNTIME
    return EXIT_CONFIG
