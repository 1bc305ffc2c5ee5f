"""``python -m experiments.<name> --help`` at once: the help is printed, with exit status 0,
before the experiment module imports JAX (seconds). ``--helpfull`` still goes through absl
(every flag of every module, after the imports)."""

from __future__ import annotations

import ast
import os
import sys

HELP_FLAGS = ("--help", "-help", "-h", "-?", "--helpshort")


def _presets(name: str) -> tuple[str, ...]:
    """``PRESETS`` of ``experiments/configs/<name>.py``, read without importing it."""
    path = os.path.join(os.path.dirname(os.path.dirname(__file__)), "configs", f"{name}.py")
    try:
        with open(path) as f:
            tree = ast.parse(f.read())
        for node in tree.body:
            if isinstance(node, ast.Assign) and any(
                    isinstance(t, ast.Name) and t.id == "PRESETS" for t in node.targets):
                return tuple(ast.literal_eval(node.value))
    except (OSError, SyntaxError, ValueError):
        pass
    return ()


def exit_if_help(name: str, doc: str | None, argv: list[str] | None = None) -> None:
    """Print the module's docstring and its flags, and exit 0, when ``argv`` (default
    ``sys.argv``) asks for help; else return."""
    argv = sys.argv if argv is None else argv
    if not any(arg.split("=")[0] in HELP_FLAGS for arg in argv[1:]):
        return
    presets = "|".join(_presets(name)) or "<preset>"
    print(f"{(doc or '').strip()}\n\nflags:\n"
          f"  --config: experiments/configs/{name}.py:<{presets}> (default :quick); override "
          f"fields with --config.<field>=<value>.\n"
          f"  --workdir: output folder (default: runs/{name}_<preset>); rerun to resume.\n"
          f"  --data_dir: the data folder (see the config file's data section).\n\n"
          f"Try --helpfull to get a list of all flags.")
    raise SystemExit(0)
