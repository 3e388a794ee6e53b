"""The README is a contract: every command in its ``bash`` blocks works as typed, in order, in a fresh
copy of the project, a fresh ``HOME`` and an empty environment (``env -i`` + a login shell).

A block preceded by ``<!-- readme-test: skip: REASON -->`` is not run (the reason is printed); one
preceded by ``<!-- readme-test: server "TEXT" -->`` must start and print TEXT, then it is stopped.
``make test`` is not run: it is the suite this test belongs to. The venv is shared with this
checkout (a symlink), as its install is what ``make`` would redo; params are the test tier's tiny
ones so the whole README runs in a few minutes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml
from helpers import ROOT, TINY, deep_update

pytestmark = pytest.mark.slow

DOCS = ["README.md", "infra/README.md", *sorted(str(p.relative_to(ROOT)) for p in (ROOT / "docs").glob("*.md"))]
NOT_RUN = {"make test": "the test suite this test is part of"}
ANNOTATION = re.compile(r"<!--\s*readme-test:\s*(skip|server)\s*:?\s*(.*?)\s*-->")


@dataclass
class Block:
    doc: str
    line: int
    commands: list[str]
    mode: str = "run"  # run | skip | server
    arg: str = ""


def blocks(text: str, doc: str) -> list[Block]:
    """The ``bash``/``sh``/``shell`` fenced blocks of a markdown text, with their annotations."""
    out, pending, lines, i = [], None, text.splitlines(), 0
    while i < len(lines):
        line = lines[i].strip()
        m = ANNOTATION.search(line)
        if m:
            pending = (m.group(1), m.group(2).strip('"'))
        elif line.startswith("```"):
            lang, start, body = line[3:].strip().split(" ")[0], i + 1, []
            i += 1
            while i < len(lines) and not lines[i].strip().startswith("```"):
                body.append(lines[i])
                i += 1
            if lang in ("bash", "sh", "shell"):
                cmds, cur = [], ""
                for raw in body:
                    cur += raw.rstrip("\\") + " " if raw.rstrip().endswith("\\") else raw
                    if not raw.rstrip().endswith("\\"):
                        if cur.strip() and not cur.strip().startswith("#"):
                            cmds.append(cur.strip())
                        cur = ""
                mode, arg = pending or ("run", "")
                out.append(Block(doc, start, cmds, mode, arg))
            pending = None
        elif line:
            pending = None if not line.startswith("<!--") else pending
        i += 1
    return out


def test_readme_blocks_are_parsed():
    found = blocks((ROOT / "README.md").read_text(), "README.md")
    cmds = [c for b in found for c in b.commands]
    assert cmds[:2] == [c for c in cmds[:2] if c.startswith("make ")] and any(c.startswith("tl ") for c in cmds)
    assert any(b.mode == "skip" and b.arg for b in found)
    server = Block("x.md", 1, ['tl serve --cron "0 3 * * *"   # comment'], "server", "is being served")
    script, _ = _script([server], Path("/w"))
    assert "tl serve --cron '0 3 * * *' > /w/server.log 2>&1 &" in script and "is being served" in script
    _, skipped = _script(found, Path("/nonexistent"))
    assert any(s.endswith("[skipped: the test suite this test is part of]") and "make test" in s for s in skipped)


def _fresh_clone(dst: Path) -> Path:
    """The working tree as a new clone would have it (tracked + new files, nothing ignored), committed."""
    files = (
        subprocess.run(
            ["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, capture_output=True, check=True
        )
        .stdout.decode()
        .split("\0")
    )
    for f in filter(None, files):
        src = ROOT / f
        if src.is_file():
            (dst / f).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / f)
    params = yaml.safe_load((dst / "params.yaml").read_text())
    (dst / "params.yaml").write_text(
        yaml.safe_dump(deep_update(params, yaml.safe_load(yaml.safe_dump(TINY))), sort_keys=False)
    )
    (dst / ".venv").symlink_to(Path(sys.executable).parents[1])
    for f in ("pyproject.toml", "requirements.lock"):  # older than the venv's install marker: make installs nothing
        subprocess.run(["touch", "-d", "2001-01-01", str(dst / f)], check=True)
    return dst


def _script(found: list[Block], work: Path) -> tuple[str, list[str]]:
    lines, skipped = ["cd " + shlex.quote(str(work / "repo"))], []
    for b in found:
        if b.mode == "skip":
            skipped += [f"{b.doc}:{b.line}: {c}  [skipped: {b.arg}]" for c in b.commands]
            continue
        for c in b.commands:
            bare = shlex.join(shlex.split(c, comments=True))
            if bare in NOT_RUN:
                skipped.append(f"{b.doc}:{b.line}: {c}  [skipped: {NOT_RUN[bare]}]")
                continue
            lines.append(f"echo {shlex.quote('>>> ' + c)}")
            if b.mode == "server":
                log = shlex.quote(str(work / "server.log"))
                lines += [
                    f"{bare} > {log} 2>&1 &",
                    "pid=$!",  # no trailing comment to swallow the redirect
                    f"for i in $(seq 1 240); do grep -q {shlex.quote(b.arg)} {log} && break; "
                    "kill -0 $pid 2>/dev/null || break; sleep 1; done",
                    f"cat {log}",
                    f"grep -q {shlex.quote(b.arg)} {log} || {{ echo '!!! server did not start: {b.doc}:{b.line}'; "
                    f"exit 1; }}",
                    "kill -INT $pid; sleep 3; kill -9 $pid 2>/dev/null; pkill -9 -P $pid 2>/dev/null; true",
                ]
            else:
                lines += [c, f'rc=$?; [ $rc -eq 0 ] || {{ echo "!!! exit $rc: {b.doc}:{b.line}"; exit 1; }}']
    return "\n".join(lines) + "\necho '>>> all README commands passed'\n", skipped


def test_every_readme_command_works_in_a_fresh_shell(tmp_path):
    found = [b for d in DOCS if (ROOT / d).is_file() for b in blocks((ROOT / d).read_text(), d)]
    repo = _fresh_clone(tmp_path / "repo")
    home = tmp_path / "home"
    home.mkdir()
    (home / ".gitconfig").write_text("[user]\n\tname = New User\n\temail = new@example.com\n")
    subprocess.run(["git", "init", "-q"], cwd=repo, check=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"})
    subprocess.run(
        ["git", "commit", "-qm", "clone"], cwd=repo, check=True, env={"HOME": str(home), "PATH": "/usr/bin:/bin"}
    )
    script, skipped = _script(found, tmp_path)
    (tmp_path / "readme.sh").write_text(script)
    for s in skipped:
        print(s)
    r = subprocess.run(
        [
            "env",
            "-i",
            f"HOME={home}",
            "USER=newuser",
            "LANG=C.UTF-8",
            "TERM=dumb",
            "PATH=/usr/local/bin:/usr/bin:/bin",
            "bash",
            "-l",
            str(tmp_path / "readme.sh"),
        ],
        capture_output=True,
        text=True,
        timeout=1200,
    )
    out = r.stdout + r.stderr
    print(out[-6000:])
    assert r.returncode == 0 and ">>> all README commands passed" in r.stdout, out[-6000:]
    assert "Traceback" not in out, out[out.index("Traceback") - 2000 : out.index("Traceback") + 3000]
    ran = [line[4:] for line in r.stdout.splitlines() if line.startswith(">>> ") and "all README" not in line]
    assert any(c.startswith("make run") for c in ran) and any(c.startswith("tl predict") for c in ran)
    assert "Cannot schedule flows" not in out  # `tl serve` runs against a server with a scheduler
