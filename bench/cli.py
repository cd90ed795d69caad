"""The `bench` command line. Each command lives in `bench/commands/<name>.py`."""

from __future__ import annotations

import importlib
import logging
import sys

import click
from rich.console import Console
from rich.text import Text

from bench.errors import BenchError, Interrupted, JobFailed

COMMANDS = ("list", "data", "run", "evaluate", "export", "report", "profile", "show")
console = Console(stderr=True)


class BenchGroup(click.Group):
    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except BenchError as exc:
            console.print("[bold red]error:[/]", Text(str(exc)), highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except JobFailed as exc:
            console.print("[bold red]failed:[/]", Text(str(exc)), highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except Interrupted as exc:
            console.print("[bold yellow]stopped:[/]", Text(str(exc)), highlight=False, soft_wrap=True)
            sys.exit(exc.exit_code)
        except KeyboardInterrupt:
            console.print("[bold yellow]stopped[/] (Ctrl-C)", highlight=False)
            sys.exit(Interrupted.exit_code)


@click.group(cls=BenchGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option("-v", "--verbose", is_flag=True, help="log debug messages")
def main(verbose: bool) -> None:
    """Benchmark robust self-supervised pretraining methods fairly and fast."""
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")


for _name in COMMANDS:
    _module = importlib.import_module(f"bench.commands.{_name}")
    main.add_command(_module.command, _name)
