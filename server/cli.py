"""Command line: ``loraplex serve`` and ``loraplex merge``.

``serve`` flags are generated from :class:`server.config.Settings`, one per field (``max_loras`` ->
``--max-loras``), so the CLI can never drift from the settings; an unset flag falls back to the
``LORAPLEX_*`` environment and then to the default. Lists take several values (or comma-separated
ones), dicts take JSON.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import types
import typing
from pathlib import Path

from pydantic import ValidationError

from server.config import Settings


def _field_kind(annotation) -> tuple[str, tuple]:
    """('scalar' | 'list' | 'dict' | 'bool' | 'choice', args) for a Settings field annotation."""
    origin = typing.get_origin(annotation)
    args = typing.get_args(annotation)
    if origin in (typing.Union, types.UnionType):  # Optional[X] -> X
        non_none = [a for a in args if a is not type(None)]
        return _field_kind(non_none[0]) if len(non_none) == 1 else ("scalar", (str,))
    if annotation is bool:
        return "bool", ()
    if origin is typing.Literal:
        return "choice", args
    if origin is list:
        return "list", args
    if origin is dict:
        return "dict", args
    return "scalar", (annotation,)


def _scalar_type(tp):
    return tp if tp in (int, float, Path) else str


def flags_of(name: str) -> list[str]:
    """``drain_timeout_s`` -> ``--drain-timeout-s`` and, for a seconds field, ``--drain-timeout`` too."""
    flag = "--" + name.replace("_", "-")
    return [flag, flag.removesuffix("-s")] if name.endswith("_s") else [flag]


def add_settings_flags(parser: argparse.ArgumentParser) -> None:
    for name, info in Settings.model_fields.items():
        flags = flags_of(name)
        kind, args = _field_kind(info.annotation)
        help_text = (info.description or "") + f" [env LORAPLEX_{name.upper()}]"
        if "key" in name and kind != "bool":
            help_text += " (prefer the env var: flags show in the process list)"
        common = dict(dest=name, default=None, help=help_text.replace("%", "%%"))  # argparse formats help
        if kind == "bool":
            parser.add_argument(*flags, action=argparse.BooleanOptionalAction, **common)
        elif kind == "choice":
            parser.add_argument(*flags, choices=list(args), **common)
        elif kind == "list":  # items are split on commas too (Settings' split_list)
            common["help"] = help_text + " (several values, or comma-separated)"
            parser.add_argument(*flags, nargs="*", type=_scalar_type(args[0] if args else str), **common)
        elif kind == "dict":
            parser.add_argument(*flags, type=json.loads, metavar="JSON", **common)
        else:
            parser.add_argument(*flags, type=_scalar_type(args[0]), **common)


def settings_from_args(ns: argparse.Namespace) -> Settings:
    overrides = {
        name: getattr(ns, name) for name in Settings.model_fields if getattr(ns, name, None) is not None
    }
    return Settings(**overrides)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="loraplex", description="Multi-LoRA inference server.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="Run the OpenAI-compatible HTTP server.")
    add_settings_flags(serve)
    serve.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])

    merge = sub.add_parser("merge", help="Export base + adapter as one standalone HF checkpoint.")
    merge.add_argument("--base", type=Path, required=True, help="Base model directory.")
    merge.add_argument("--adapter", required=True, help="Adapter directory, or a name in --adapter-store.")
    merge.add_argument("--out", type=Path, required=True, help="Output directory for the merged model.")
    merge.add_argument("--adapter-store", type=Path, default=None, help="Store to look adapter names up in.")

    # Client commands (adapters, complete, loadtest) talk to a running server over HTTP.
    from clients.cli import register

    register(sub)
    return parser


def is_loopback(host: str) -> bool:
    """True for addresses only this machine can reach (auth-less serving is meant for those)."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def prepare_server_process(settings: Settings, log_level: str) -> None:
    """What a serving process sets up before it builds the runtime: the CPU runtime (re-executed once
    under the tuned allocator and OpenMP), logging, and a log line saying what it runs with. Shared
    with the tests' fault-injecting server, so a soak measures the process users run."""
    from server import runtime_env

    runtime_env.reexec_if_needed(settings.runtime_tuning, settings.device)  # returns when nothing to do

    import torch  # noqa: F401 - loads OpenMP now, in this thread, which it pins to one core

    from server.model.loader import ASYNC_LOAD_OFF

    if runtime_env.serves_on_cpu(settings.device):  # now, while this is the only thread (see the loader)
        os.environ.setdefault(ASYNC_LOAD_OFF, "1")

    runtime_env.unpin_main_thread()
    logging.basicConfig(level=log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("loraplex").info(runtime_env.describe(runtime_env.loaded_libraries(), dict(os.environ)))


def cmd_serve(ns: argparse.Namespace) -> int:
    settings = settings_from_args(ns)
    prepare_server_process(settings, ns.log_level)

    from server.api.app import create_app
    from server.api.serving import serve

    if not (settings.api_keys or settings.admin_keys) and not is_loopback(settings.host):
        logging.getLogger("loraplex").warning(
            "auth is off (no LORAPLEX_API_KEYS / LORAPLEX_ADMIN_KEYS) and the server listens on %s: "
            "anyone who can reach it may upload, load, merge and delete adapters",
            settings.host,
        )
    serve(create_app(settings), settings.host, settings.port, ns.log_level)
    return 0


def resolve_adapter_dir(adapter: str, store_root: Path | None) -> Path:
    """A directory as given, else ``<store>/<name>`` (name checked, so no traversal)."""
    from server.store import AdapterStore

    path = Path(adapter)
    if path.is_dir():
        return path
    store = AdapterStore(store_root or Settings.model_fields["adapter_store"].default)
    if not store.exists(adapter):
        raise FileNotFoundError(f"adapter '{adapter}' is neither a directory nor in the store {store.root}")
    return store.path_of(adapter)


def cmd_merge(ns: argparse.Namespace) -> int:
    from server.lora.merge import export_merged
    from server.store import tree_digest

    adapter_dir = resolve_adapter_dir(ns.adapter, ns.adapter_store)
    out = export_merged(ns.base, adapter_dir, ns.out)
    out = Path(out or ns.out)
    print(json.dumps({"path": str(out.resolve()), "digest": f"sha256:{tree_digest(out)}"}))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    ns = parser.parse_args(argv)
    if hasattr(ns, "func"):
        from clients.cli import run

        return run(ns)
    try:
        if ns.command == "serve":
            return cmd_serve(ns)
        return cmd_merge(ns)
    except ValidationError as exc:
        print(f"loraplex: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        print(f"loraplex: {exc}", file=sys.stderr)
        return 2
