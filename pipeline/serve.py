"""`prerouter serve BUNDLE`, and the `prerouter` console script.

The console script (`entry`) runs `serve` without the training stack (a runtime install with the
`serve` extra) and every other command through the full CLI, or says in one line which extra to
install when the training stack is missing.
"""
from __future__ import annotations

import sys


def entry(argv: list[str] | None = None) -> None:
    """The `prerouter` console script."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["serve"]:
        sys.exit(main(argv[1:]))
    try:
        from .cli import main as cli_main
    except ImportError as e:
        missing = getattr(e, "name", None) or str(e)
        command = argv[0] if argv else "the CLI"
        print(f"prerouter: `{command}` needs the training stack, which is not installed (no module {missing!r}); "
              "install it with: pip install 'prerouter[train]'  (a runtime-only install has `prerouter serve` "
              "with the [serve] extra, and pipeline.runtime.Router)", file=sys.stderr)
        sys.exit(2)
    cli_main()


def main(argv: list[str] | None = None) -> int:
    """`prerouter serve` without typer: parse the arguments, load and verify the bundle, serve."""
    raise NotImplementedError
