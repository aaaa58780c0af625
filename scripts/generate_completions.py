"""Regenerate the shell completion scripts in completions/ (run after changing commands or options).

python scripts/generate_completions.py           # rewrite completions/
python scripts/generate_completions.py --check   # exit 1 if they are out of date (tests run this)
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

SHELLS = {"bash": "compactedit.bash", "zsh": "_compactedit", "fish": "compactedit.fish"}
FOLDER = Path(__file__).resolve().parents[1] / "completions"


def render(shell: str) -> str:
    """The completion script Typer generates for ``shell``."""
    env = {**os.environ, "_COMPACTEDIT_COMPLETE": f"source_{shell}"}
    code = "import sys; sys.argv[0] = 'compactedit'; from compactedit_cli.cli import main; main()"
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    return done.stdout


def main() -> int:
    check = "--check" in sys.argv[1:]
    stale = []
    for shell, name in SHELLS.items():
        path = FOLDER / name
        text = render(shell)
        if check:
            if not path.is_file() or path.read_text() != text:
                stale.append(name)
        else:
            FOLDER.mkdir(exist_ok=True)
            path.write_text(text)
    if stale:
        print(f"out of date: {', '.join(stale)} (run python scripts/generate_completions.py)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
