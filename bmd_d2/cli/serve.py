"""``bmd-serve``: the DICOM node (docs/pacs.md).

    bmd-serve run --config node.yaml            # SCP + worker until SIGTERM/SIGINT
    bmd-serve run --config node.yaml --once     # process what is received/queued until idle, then exit
    bmd-serve status --config node.yaml         # JSON: the node and every series version (hashed ids)
    bmd-serve check --config node.yaml          # validate the config

Exit codes: 0 ok; 2 a config or user error (one ``error:`` line on stderr).
"""
import argparse
import json
import logging
import signal
import sys
from typing import List, Optional

from bmd_d2.errors import BMDError
from bmd_d2.utils.logs import redact, setup_cli_logging

logger = logging.getLogger(__name__)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="bmd-serve", description="DICOM node: receive CT series, measure BMD, send "
                                "DICOM SEG/SR/SC back (docs/pacs.md).",
                                epilog="exit codes: 0 ok, 2 config or user error (one 'error:' line)")
    sub = p.add_subparsers(dest="command", required=True)
    for name, text in (("run", "receive, measure and send until stopped"),
                       ("status", "print the node's state as JSON"), ("check", "validate the config file")):
        c = sub.add_parser(name, help=text)
        c.add_argument("--config", required=True, metavar="YAML", help="node config file")
        if name == "run":
            c.add_argument("--once", action="store_true", help="process what is there until idle, then exit")
            c.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only")
            c.add_argument("-v", "--verbose", action="count", default=0, help="libraries' INFO (-vv: DEBUG)")
    return p


def _run(cfg, args) -> int:
    import os

    from bmd_d2.serve.node import Node, add_file_log

    os.umask(0o077)  # reports, logs and anything a library writes: the node's user only
    handler = setup_cli_logging(quiet=args.quiet, verbosity=args.verbose)
    add_file_log(cfg, handler)
    node = Node(cfg)  # the model is loaded here: a model/weights error exits 2 before anything listens

    def _stop(signum, frame):
        logger.info("signal %d: stopping", signum)
        node.stop_event.set()

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    node.run(once=args.once)
    logger.info("stopped")
    return 0


def run_command(args) -> int:
    """Run the parsed command; a :class:`BMDError` becomes one ``error:`` line and exit code 2."""
    try:
        from bmd_d2.serve.config import describe, load_node_config

        cfg = load_node_config(args.config)
        if args.command == "check":
            print(json.dumps({"ok": True, **describe(cfg)}, indent=2))
            return 0
        if args.command == "status":
            from bmd_d2.serve.node import status

            print(json.dumps(status(cfg), indent=2))
            return 0
        return _run(cfg, args)
    except BMDError as e:
        print(f"error: {redact(str(e))}", file=sys.stderr)
        return 2


def main(argv: Optional[List[str]] = None) -> int:
    """Console entry point (``bmd-serve``); returns/exits with the code in the module docstring."""
    code = run_command(build_parser().parse_args(argv))
    if argv is None:
        sys.exit(code)
    return code


if __name__ == "__main__":
    main()
