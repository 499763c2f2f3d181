"""The README's three walk-throughs run as written, in order, against the `make run` server.

Every ```sh block under a "### Walk-through:" heading of the README's "## Clients" section
is run, command by command, by bash, as a person would paste it: in a scratch copy of the
clone (its files linked, its own `var/`), with the state a shell keeps (exported variables,
an activated venv, the directory) carried from one command to the next. The only thing
substituted is the target: `KPISETTLE_TARGET` points at a `python -m server.dev` started
on port 0 with `KPISETTLE_VAR_DIR` in the scratch `var/`.

Each command must exit 0, or the code its trailing comment names (`# exits 1: …`). A
```text block right after a ```sh block is the expected output of that block's last
command: each of its lines must appear in the output (stdout, then stderr), in order, with
runs of spaces matching any whitespace and "…" matching anything; a line that is only "…"
stands for lines left out. Then the files the walk-throughs wrote are checked for the
figures billing relies on.
"""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path

from tests.conftest import ROOT

WALKTHROUGH = "### Walk-through:"
EXITS = re.compile(r"#\s*exits\s+(\d+)\b")


@dataclass(frozen=True)
class Command:
    section: str
    text: str
    exit_code: int
    expected: tuple[str, ...]  # expected output lines (for the block's last command)


def clients_section(readme: str) -> str:
    start = readme.index("\n## Clients\n")
    end = readme.find("\n## ", start + 1)
    return readme[start : end if end != -1 else len(readme)]


def commands_of(block: str) -> list[str]:
    """The block's commands: comment-only lines dropped, backslash continuations joined."""
    commands, pending = [], ""
    for line in block.splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        commands.append(pending + line)
        pending = ""
    assert not pending, f"a continuation line ends the block: {pending!r}"
    return commands


def walkthrough_commands(readme: str) -> list[Command]:
    section = clients_section(readme)
    parts = section.split("\n" + WALKTHROUGH)[1:]
    assert len(parts) == 3, "expected three walk-throughs (ERP, billing, compliance)"
    found: list[Command] = []
    for part in parts:
        part = part.split("\n### ", 1)[0]  # a walk-through ends at the next subsection
        title = part.splitlines()[0].strip()
        blocks = list(re.finditer(r"```(sh|text)\n(.*?)```", part, re.DOTALL))
        for i, block in enumerate(blocks):
            if block.group(1) != "sh":
                continue
            following = blocks[i + 1] if i + 1 < len(blocks) else None
            expected: tuple[str, ...] = ()
            if following is not None and following.group(1) == "text" and not part[block.end() : following.start()].strip():
                expected = tuple(line for line in following.group(2).splitlines() if line.strip())
            texts = commands_of(block.group(2))
            assert texts, f"{title}: an empty sh block"
            for n, text in enumerate(texts):
                exits = EXITS.search(text)
                found.append(Command(title, text, int(exits.group(1)) if exits else 0, expected if n == len(texts) - 1 else ()))
    return found


def line_pattern(expected: str) -> re.Pattern[str]:
    parts = []
    for token in re.split(r"(…|\s+)", expected.strip()):
        if token == "…":
            parts.append(".*?")
        elif token and token.isspace():
            parts.append(r"\s+")
        elif token:
            parts.append(re.escape(token))
    return re.compile("".join(parts))


def assert_shows(command: Command, output: str) -> None:
    lines = [line.strip() for line in output.splitlines()]
    at = 0
    for expected in command.expected:
        if expected.strip() == "…":
            continue
        pattern = line_pattern(expected)
        while at < len(lines) and not pattern.fullmatch(lines[at]):
            at += 1
        assert at < len(lines), f"{command.section}: `{command.text}` did not print (in this order)\n{expected}\n--- it printed:\n{output}"
        at += 1


class Shell:
    """Runs one command at a time in bash, keeping the environment and directory a shell would keep."""

    def __init__(self, cwd: Path, env: dict[str, str], state: Path) -> None:
        self.cwd, self.env, self._state = cwd, env, state

    def run(self, text: str) -> subprocess.CompletedProcess[str]:
        env_file, pwd_file = self._state / "env", self._state / "pwd"
        script = f'{text}\n__status=$?\nenv -0 > "{env_file}"\npwd > "{pwd_file}"\nexit $__status\n'
        done = subprocess.run(["bash", "-c", script], cwd=self.cwd, env=self.env, capture_output=True, text=True, timeout=120)
        pairs = (item.split("=", 1) for item in env_file.read_text(encoding="utf-8").split("\0") if "=" in item)
        self.env = {k: v for k, v in pairs if not k.startswith("BASH_FUNC_")}
        self.cwd = Path(pwd_file.read_text(encoding="utf-8").strip())
        return done


def scratch_clone(tmp_path: Path) -> Path:
    """The clone's top-level files linked into a directory with its own empty var/."""
    clone = tmp_path / "clone"
    clone.mkdir()
    for entry in ROOT.iterdir():
        if entry.name != "var":
            (clone / entry.name).symlink_to(entry)
    (clone / "var").mkdir()
    return clone


def start_dev_server(var: Path) -> tuple[subprocess.Popen[str], int, list[str]]:
    env = {**os.environ, "KPISETTLE_VAR_DIR": str(var)}
    server = subprocess.Popen(
        [sys.executable, "-m", "server.dev", "--listen", "127.0.0.1:0"],
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    lines: list[str] = []
    threading.Thread(target=lambda: lines.extend(server.stdout or []), daemon=True).start()
    deadline = time.monotonic() + 60
    while not any(line.startswith("kpisettle listening on ") for line in lines):
        if server.poll() is not None or time.monotonic() > deadline:
            server.kill()
            raise AssertionError("the development server did not start:\n" + "".join(lines))
        time.sleep(0.05)
    found = re.search(r"kpisettle listening on 127\.0\.0\.1:(\d+)", "".join(lines))
    assert found is not None
    return server, int(found.group(1)), lines


def read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as stream:
        return list(csv.DictReader(stream))


def sums(rows: list[dict[str, str]], column: str) -> dict[str, Decimal]:
    totals: dict[str, Decimal] = {}
    for row in rows:
        totals[row["currency"]] = totals.get(row["currency"], Decimal(0)) + Decimal(row[column])
    return totals


def run_all(shell: Shell, commands: list[Command]) -> Iterator[tuple[Command, subprocess.CompletedProcess[str]]]:
    for command in commands:
        done = shell.run(command.text)
        output = done.stdout + done.stderr
        assert done.returncode == command.exit_code, (
            f"{command.section}: `{command.text}` exited {done.returncode}, the README says {command.exit_code}\n{output}"
        )
        assert_shows(command, output)
        yield command, done


def test_the_readme_walkthroughs_run_as_written(tmp_path: Path) -> None:
    commands = walkthrough_commands((ROOT / "README.md").read_text(encoding="utf-8"))
    assert len({c.section for c in commands}) == 3
    clone = scratch_clone(tmp_path)
    server, port, printed = start_dev_server(clone / "var")
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("KPISETTLE_", "VIRTUAL_ENV"))}
        env["KPISETTLE_TARGET"] = f"127.0.0.1:{port}"
        state = tmp_path / "shell"
        state.mkdir()
        ran = list(run_all(Shell(clone, env, state), commands))
        assert len(ran) == len(commands)
        assert any(c.exit_code == 1 for c in commands) and any(c.exit_code == 2 for c in commands)

        # what the walk-throughs wrote: the ERP results, billing's two exports
        var = clone / "var"
        results = read_csv(var / "erp-2026-03-results.csv")
        assert len(results) == 32 and [r["row"] for r in results] == [str(n) for n in range(1, 33)]
        assert [(r["contract_id"], r["error_code"]) for r in results if r["error_code"]] == [
            ("C-3005", "INVALID_ARGUMENT"),
            ("C-4001", "FAILED_PRECONDITION"),
        ]
        assert sums([r for r in results if not r["error_code"]], "total") == {
            "EUR": Decimal("46054.86"),
            "JPY": Decimal("7859001"),
            "USD": Decimal("118696.64"),
        }
        # billing's lines (exported before the correction) add up to ERP's totals plus the fixed EUR row (7662.55)
        lines = read_csv(var / "invoice-lines-2026-03.csv")
        assert len(lines) == 234 and len({r["settlement"] for r in lines}) == 31
        assert sums(lines, "amount") == {"EUR": Decimal("53717.41"), "JPY": Decimal("7859001"), "USD": Decimal("118696.64")}
        assert {(r["revision"], r["amount"]) for r in lines if r["contract_id"] == "C-1110" and r["line"] == "gmv_bonus"} == {
            ("1", "500.00")
        }
        deltas = read_csv(var / "invoice-deltas-2026-03.csv")
        assert [(r["contract_id"], r["revision"], r["line"], r["previous_amount"], r["amount"], r["delta"]) for r in deltas] == [
            ("C-1110", "2", "commission", "5320.00", "5170.00", "-150.00"),
            ("C-1110", "2", "gmv_bonus", "500.00", "0.00", "-500.00"),
        ]
        assert deltas[0]["supersedes"] == next(r["name"] for r in results if r["contract_id"] == "C-1110")
    finally:
        server.terminate()
        code = server.wait(30)
    assert code == 0, "".join(printed)
