"""The ``vbremote`` command (``python -m vbremote``).

Built on click (commands and options) and rich (tables and progress bars).
:func:`main` runs it and turns errors into one line on stderr and an exit
code (see :data:`EXIT_CODES` and the CLI reference).
"""

from __future__ import annotations

import sys

import click

from .._errors import VBRemoteError
from ._app import EXIT_CODES, EXIT_INTERRUPTED, EXIT_USAGE, App, CommandFailed, exit_code_for, report_error
from ._commands import cli
from ._restore import drill as _drill  # noqa: F401  (registers the command)
from ._restore import restore as _restore  # noqa: F401  (registers the command)
from ._snapshot import snapshot as _snapshot  # noqa: F401  (registers the command)

__all__ = ["EXIT_CODES", "cli", "main"]


def main(argv: list[str] | None = None) -> int:
    """Run the ``vbremote`` command.

    Args:
        argv: The arguments (default: ``sys.argv[1:]``).

    Returns:
        The exit code (also passed to :func:`sys.exit` when run as a script).
    """
    app = App()
    try:
        cli.main(args=argv, prog_name="vbremote", standalone_mode=False, obj=app)
    except CommandFailed as exc:
        report_error(exc, code=exc.exit_code, as_json=False, verbosity=0)
        return exc.exit_code
    except VBRemoteError as exc:
        code = exit_code_for(exc)
        report_error(exc, code=code, as_json=app.json, verbosity=app.verbosity)
        return code
    except click.exceptions.Abort as exc:
        # click turns Ctrl-C into Abort; a "no" to a confirmation says so in its message.
        sys.stderr.write(f"vbremote: {str(exc) or 'interrupted'}\n")
        return EXIT_INTERRUPTED
    except click.ClickException as exc:
        exc.show()
        return exc.exit_code if exc.exit_code else EXIT_USAGE
    except KeyboardInterrupt:
        sys.stderr.write("vbremote: interrupted\n")
        return EXIT_INTERRUPTED
    return 0

