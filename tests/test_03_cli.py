"""The command line of 03_accountant.py, run as a user runs it (a subprocess).

A mistyped value must be refused before anything is computed or written: exit status 2 (as
argparse uses), one line on stderr that names the flag and says what to give instead, no
traceback, nothing on stdout, and the output folder left byte for byte as it was."""
import pathlib
import re
import subprocess
import sys

import pytest

SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "03_accountant.py"
TYPOS = ("0", "-1", "nan", "inf", "abc")
QUERY = ("--noise-multiplier", "1", "--no-tight")  # a quick valid run around each bad value
# flag: (values that must be refused, the rest of the command line). Every flag that takes a
# value is here; --table, --no-tight and --audit take none. --out must not be a file (below).
BAD = {
    "--noise-multiplier": (TYPOS, ("--no-tight",)),
    "--sigma": (TYPOS, ("--no-tight",)),  # the older name of --noise-multiplier
    "--target-epsilon": (TYPOS, ("--no-tight",)),
    "--q": (TYPOS + ("1.5",), QUERY),
    "--batch-size": (TYPOS + ("2.5",), QUERY),
    "--n": (TYPOS + ("2.5",), QUERY),
    "--steps": (TYPOS + ("2.5",), QUERY),
    "--epochs": (TYPOS, QUERY),
    "--delta": (TYPOS + ("1",), QUERY),
    "--threads": (TYPOS + ("2.5",), QUERY),
}
CASES = [(flag, value, rest) for flag, (values, rest) in BAD.items() for value in values]
CASES += [("--out", "FILE", ()), ("--out", "FILE/sub", ()), ("--out", "FILE", QUERY)]
CASES += [("--delta", "1e-3", QUERY + ("--n", "1000"))]  # delta must lie well below 1/N
CASES += [("--epochs", "1e-9", QUERY)]  # rounds to 0 steps


def snapshot(folder):
    """Every file under folder: relative name -> bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def run(args, cwd):
    return subprocess.run([sys.executable, str(SCRIPT), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.parametrize("flag, value, rest", CASES,
                         ids=[" ".join((flag, value) + rest) for flag, value, rest in CASES])
def test_bad_value_is_refused_in_one_line(tmp_path, flag, value, rest):
    out = tmp_path / "out"
    out.mkdir()
    (out / "earlier_result.txt").write_text("kept as it is\n")
    (tmp_path / "FILE").write_text("a file, not a folder\n")
    before = snapshot(tmp_path)
    value = str(tmp_path / value) if value.startswith("FILE") else value
    given_out = () if flag == "--out" else ("--out", str(out))
    result = run([*rest, *given_out, flag, value], cwd=tmp_path)
    lines = result.stderr.splitlines()
    assert result.returncode == 2, result.stderr
    assert len(lines) == 1 and lines[0].strip(), result.stderr
    assert flag in lines[0]
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert snapshot(tmp_path) == before


def test_help_gives_every_flag_and_its_default(tmp_path):
    result = run(["--help"], cwd=tmp_path)
    assert result.returncode == 0
    options = re.split(r"\n(?:options|optional arguments):\n", result.stdout)[1]
    entries = re.split(r"\n  (?=-)", "\n" + options)[1:]  # one per flag, its help included
    named = {name for entry in entries for name in re.findall(r"--[a-z-]+", entry.split("  ")[0])}
    assert named >= set(BAD) | {"--out", "--table", "--no-tight", "--audit"}
    for entry in entries:
        if not entry.startswith("-h"):
            assert "default" in entry, entry


@pytest.mark.parametrize("args", [
    ("--noise-multiplier", "1", "--q", "1", "--steps", "1"),  # q = 1: the Gaussian mechanism
    ("--noise-multiplier", "1", "--epochs", "0.5", "--delta", "1e-12"),
    ("--target-epsilon", "100", "--batch-size", "100000", "--n", "10"),  # B > N: q = 1
])
def test_legal_edge_values_are_accepted(accountant, args):
    accountant.parse_args(list(args))
