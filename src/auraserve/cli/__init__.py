"""The `auraserve` command: serve, worker, generate, keys, credits, workers, db.

Exit status: 0 done; 1 the command ran and the answer is no (no such account to show, no
active key to revoke) or the weights cannot be loaded; 2 the command cannot run as given (a
wrong flag or value, an invalid setting, a store that is not there or cannot be reached, an
account that does not exist). Every failure a user can fix ends with one line on stderr that
names the problem (a command-line mistake: after the command's usage, with a did-you-mean),
never a traceback. Output is text for people; every command takes --json for scripts.

The admin commands (keys, credits, workers, db) name on stderr the store they used, so a key made
against the wrong data directory is noticed at once; when a command may create a store is
decided in `stores` (its docstring).

Only `generate`, `worker` and `serve` with in-process workers load the model stack (torch,
diffusers); they import it inside the command, so the admin commands and API-only replicas
(`serve --workers 0`) start without it.
"""

from auraserve.cli.flags import SETTING_FLAGS
from auraserve.cli.parser import build_parser, main

__all__ = ["SETTING_FLAGS", "build_parser", "main"]
