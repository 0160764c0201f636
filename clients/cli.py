"""Command line for the client side: ``adapters ...``, ``complete ...``, ``loadtest ...``.

Usable standalone (``python -m clients ...``) or mounted into the server's ``loraplex`` command with
:func:`register`, which adds the three subcommands to an argparse subparsers object; each parsed
namespace carries ``func(args) -> int`` (the exit code).

Connection options come from flags or ``LORAPLEX_URL`` / ``LORAPLEX_API_KEY`` / ``LORAPLEX_ADMIN_KEY``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from clients.client import DEFAULT_BASE_URL, LoraplexClient
from clients.errors import LoraplexError
from clients.loadgen import cli as loadtest_cli
from clients.loadgen.target import TargetNotAllowed


def _connection_parent() -> argparse.ArgumentParser:
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--url", default=os.environ.get("LORAPLEX_URL", DEFAULT_BASE_URL), help="server base URL"
    )
    parent.add_argument("--api-key", default=os.environ.get("LORAPLEX_API_KEY"), help="bearer key")
    parent.add_argument(
        "--admin-key", default=os.environ.get("LORAPLEX_ADMIN_KEY"), help="key for adapter changes"
    )
    parent.add_argument("--timeout", type=float, default=120.0, help="per-request timeout in seconds")
    return parent


def _client(args: argparse.Namespace) -> LoraplexClient:
    return LoraplexClient(args.url, api_key=args.api_key, admin_key=args.admin_key, timeout=args.timeout)


def _print_json(obj) -> None:
    print(json.dumps(obj, indent=2, default=str))


# --- adapters ---------------------------------------------------------------------------------
def _adapters(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.action == "upload":
            info = client.upload_adapter(args.dir, args.name)
            print(f"uploaded {info.name}" + (f" (rank {info.rank})" if info.rank else ""))
        elif args.action == "ls":
            adapters = client.list_adapters()
            if args.json:
                _print_json([a.raw for a in adapters])
            else:
                for a in adapters:
                    extra = " ".join(
                        f"{k}={v}"
                        for k, v in (("rank", a.rank), ("source", a.source), ("resident", a.resident))
                        if v is not None
                    )
                    print(f"{a.name}\t{extra}".rstrip())
        elif args.action == "get":
            _print_json(client.get_adapter(args.name).raw)
        elif args.action == "rm":
            client.delete_adapter(args.name)
            print(f"deleted {args.name}")
        elif args.action == "merge":
            result = client.merge_adapter(args.name)
            print(result.path or json.dumps(result.raw))
        elif args.action == "load":
            client.load_lora_adapter(args.name, args.path)
            print(f"loaded {args.name} from {args.path}")
        elif args.action == "unload":
            client.unload_lora_adapter(args.name)
            print(f"unloaded {args.name}")
    return 0


def _add_adapters(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("adapters", help="manage adapters on a running server")
    actions = p.add_subparsers(dest="action", required=True)
    up = actions.add_parser("upload", parents=[parent], help="upload a PEFT adapter directory")
    up.add_argument("dir", type=Path)
    up.add_argument("--name", required=True)
    ls = actions.add_parser("ls", parents=[parent], help="list adapters")
    ls.add_argument("--json", action="store_true")
    for action, text in (
        ("get", "show one adapter"),
        ("rm", "delete an adapter"),
        ("unload", "vLLM-style unload"),
    ):
        actions.add_parser(action, parents=[parent], help=text).add_argument("name")
    merge = actions.add_parser("merge", parents=[parent], help="export the adapter merged into the base")
    merge.add_argument("name")
    load = actions.add_parser("load", parents=[parent], help="vLLM-style load from a server-side path")
    load.add_argument("name")
    load.add_argument("path")
    p.set_defaults(func=_adapters)


# --- complete ---------------------------------------------------------------------------------
def _complete(args: argparse.Namespace) -> int:
    model = args.adapter or args.model
    sampling = {"max_tokens": args.max_tokens, "temperature": args.temperature, "seed": args.seed}
    with _client(args) as client:
        if args.chat:
            messages = [{"role": "user", "content": args.prompt}]
            if args.no_stream:
                print(client.chat(messages, model, **sampling).text)
                return 0
            stream = client.stream_chat(messages, model, **sampling)
        else:
            if args.no_stream:
                print(client.complete(args.prompt, model, **sampling).text)
                return 0
            stream = client.stream_complete(args.prompt, model, **sampling)
        usage = None
        for chunk in stream:
            if chunk.text:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
            usage = chunk.usage or usage
        sys.stdout.write("\n")
        if usage is not None and args.usage:
            print(
                f"[{usage.prompt_tokens} prompt + {usage.completion_tokens} completion tokens]",
                file=sys.stderr,
            )
    return 0


def _add_complete(subparsers, parent: argparse.ArgumentParser) -> None:
    p = subparsers.add_parser("complete", parents=[parent], help="generate text (streams to stdout)")
    p.add_argument("prompt")
    p.add_argument("--adapter", help="adapter name (default: the base model)")
    p.add_argument("--model", help="served model name (default: the server's base model)")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--chat", action="store_true", help="use /v1/chat/completions with one user message")
    p.add_argument("--no-stream", action="store_true")
    p.add_argument("--usage", action="store_true", help="print token usage to stderr")
    p.set_defaults(func=_complete)


# --- entry points -----------------------------------------------------------------------------
def register(subparsers) -> None:
    """Add ``adapters``, ``complete`` and ``loadtest`` to an argparse ``add_subparsers()`` object."""
    parent = _connection_parent()
    _add_adapters(subparsers, parent)
    _add_complete(subparsers, parent)
    loadtest_cli.add_parser(subparsers, parent)


def run(args: argparse.Namespace) -> int:
    """Dispatch a namespace parsed with :func:`register`'s parsers, mapping client errors to exit 1."""
    try:
        return args.func(args)
    except (LoraplexError, TargetNotAllowed, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m clients", description="loraplex client tools")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))
