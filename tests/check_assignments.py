"""Check that every assignment's grader grades one thing. Run by hand; pytest does not collect it
(pytest.ini collects test_*.py only).

    python tests/check_assignments.py               # all chapters (tens of minutes on 1 core)
    python tests/check_assignments.py --only 01 --only 02

ASSIGNMENTS below is the README's assignment table as data. For each row the script copies the
repository to a temporary directory, blanks the row's functions there (body -> `raise
NotImplementedError`, signature and docstring kept, edited through the AST), runs every grader in
that copy, and checks that
  1. the row's own grader fails (the exercise is really graded),
  2. no other row's grader fails, unless that row lists the blanked function as a documented
     dependency (then the dependency is part of the lesson and the README says so),
  3. on an unmodified copy every grader passes.
It prints a matrix (blanked row x grader) and exits with status 1 on any violation. Chapters import
nothing from each other, so --only restricts both the blanked rows and the graders run.
"""
import argparse
import ast
import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET

ROOT = pathlib.Path(__file__).resolve().parents[1]

# (script, functions the student writes, grader = pytest arguments, documented dependencies:
#  "script:function" whose blanking may also fail this grader, with the reason in a comment)
T01, T02 = "tests/test_01_toy_diffusion.py", "tests/test_02_dpsgd_from_scratch.py"
T03, T04E, T04 = "tests/test_03_accountant.py", "tests/test_04_eval.py", "tests/test_04_dpdm_mnist.py"
ASSIGNMENTS = [
    ("01_toy_diffusion.py", ("gmm_denoiser",), [T01, "-k", "monte_carlo or shrinkage"], ()),
    ("01_toy_diffusion.py", ("edm_precond", "edm_loss"), [T01, "-k", "precond or edm_loss"], ()),
    ("01_toy_diffusion.py", ("heun_step", "sample_churn"),
     [T01, "-k", "heun or churn or exact_denoiser"], ()),
    ("02_dpsgd_from_scratch.py", ("clip_per_example",), [T02, "-k", "clipping or pre_noise_sum"], ()),
    ("02_dpsgd_from_scratch.py", ("poisson_sample",), [T02, "-k", "binomial"], ()),
    ("02_dpsgd_from_scratch.py", ("per_example_grads",), [T02, "-k", "match_naive"], ()),
    ("03_accountant.py", ("eps_from_rdp_balle2020",), [T03, "-k", "balle_conversion"], ()),
    ("03_accountant.py", ("log_a_integer",), [T03, "-k", "rdp_matches_oracle"], ()),
    ("03_accountant.py", ("calibrate_noise",), [T03, "-k", "calibrated_sigma_never_overshoots"], ()),
    ("04_dpdm_mnist.py", ("frechet_distance",), [T04E, "-k", "frechet"], ()),
    ("04_dpdm_mnist.py", ("train_classifier",),
     [T04E, "-k", "best_validation or never_touches or easy_set"], ()),
    ("04_dpdm_mnist.py", ("clip_per_example",),
     [T04, "-k", "clips_every_example or clip_sum_equals_naive"], ()),
]
IGNORE = shutil.ignore_patterns(".git", ".venv", "out", "data", "figures", "__pycache__",
                                ".pytest_cache", ".benchmarks", "*.pyc")


def chapter(row):
    return row[0][:2]


def label(row):
    return f"{chapter(row)} {', '.join(row[1])}"


def blank_functions(source, names):
    """The source with each named top-level function's body replaced by `raise
    NotImplementedError`; decorators, signature, docstring and every other line kept as they are."""
    tree = ast.parse(source)
    lines = source.splitlines(keepends=True)
    defs = [n for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
    nodes = []
    for name in names:
        found = [n for n in defs if n.name == name]
        if len(found) != 1:
            raise LookupError(f"{len(found)} top-level functions named {name!r}")
        nodes.append(found[0])
    for node in sorted(nodes, key=lambda n: n.lineno, reverse=True):  # bottom-up: line numbers hold
        body = node.body
        has_doc = (isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                   and isinstance(body[0].value.value, str))
        rest = body[1:] if has_doc else body
        indent = " " * (body[0].col_offset if body[0].lineno > node.lineno else node.col_offset + 4)
        if not rest:  # a docstring only: add the raise after it
            lines.insert(body[0].end_lineno, f"{indent}raise NotImplementedError\n")
            continue
        if rest[0].lineno == node.lineno or (has_doc and rest[0].lineno == body[0].end_lineno):
            raise ValueError(f"{node.name}: body shares a line with its def or docstring")
        lines[rest[0].lineno - 1:rest[-1].end_lineno] = [f"{indent}raise NotImplementedError\n"]
    new = "".join(lines)
    for node in ast.parse(new).body:  # the result parses, and each named body is now a raise
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name in names:
            assert isinstance(node.body[-1], ast.Raise) and len(node.body) <= 2, node.name
    return new


def collect(copy, grader):
    """Node ids that the grader's pytest arguments select."""
    out = run_pytest(copy, grader + ["--collect-only"], junit=None)  # -q: one node id a line
    return {line.strip() for line in out.splitlines() if line.startswith(grader[0] + "::")}


def run_pytest(copy, args, junit):
    cmd = [sys.executable, "-m", "pytest", "-p", "no:cacheprovider", "-q"] + args
    if junit:
        cmd += [f"--junitxml={junit}", "-o", "junit_family=xunit1"]
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    proc = subprocess.run(cmd, cwd=copy, env=env, capture_output=True, text=True)
    return proc.stdout + proc.stderr


def outcomes(junit):
    """{node id: 'passed' | 'failed' | 'skipped'} from a junit XML report."""
    result = {}
    for case in ET.parse(junit).getroot().iter("testcase"):
        path = case.get("file") or ""
        module = path[:-3].replace("/", ".")  # classname = module[.Class]
        classes = case.get("classname", "")[len(module) + 1:] if path else ""
        node = "::".join([path] + ([classes.replace(".", "::")] if classes else []) + [case.get("name")])
        failed = case.find("failure") is not None or case.find("error") is not None
        skipped = case.find("skipped") is not None
        result[node] = "failed" if failed else "skipped" if skipped else "passed"
    return result


def run_graders(copy, rows, selected, workdir, tag):
    """{row index: True if its grader passed}: one pytest run per test file, every grader's tests."""
    by_file = {}
    for i in rows:
        by_file.setdefault(ASSIGNMENTS[i][2][0], []).append(i)
    status = {}
    for n, (test_file, idx) in enumerate(by_file.items()):
        ids = sorted(set().union(*(selected[i] for i in idx)))
        junit = workdir / f"{tag}-{n}.xml"
        run_pytest(copy, ids, junit)
        got = outcomes(junit) if junit.exists() else {}
        for i in idx:  # a test that did not run (collection error, crash) counts as failed
            status[i] = all(got.get(t) in ("passed", "skipped") for t in selected[i])
    return status


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--only", action="append", metavar="CHAPTER",
                   help="chapter number(s) to check, e.g. --only 01 --only 02 (default: all)")
    args = p.parse_args(argv)
    rows = [i for i, r in enumerate(ASSIGNMENTS) if not args.only or chapter(r) in args.only]
    if not rows:
        p.error(f"no assignment in chapters {args.only}")
    violations = []
    with tempfile.TemporaryDirectory(prefix="check_assignments_") as tmp:
        tmp = pathlib.Path(tmp)
        clean = tmp / "clean"
        shutil.copytree(ROOT, clean, ignore=IGNORE)
        selected = {i: collect(clean, ASSIGNMENTS[i][2]) for i in rows}
        for i in rows:
            if not selected[i]:
                violations.append(f"grader of [{label(ASSIGNMENTS[i])}] selects no test: "
                                  f"pytest {' '.join(ASSIGNMENTS[i][2])}")
        rows = [i for i in rows if selected[i]]
        print(f"{len(rows)} graders, {sum(len(selected[i]) for i in rows)} tests; blanking each row "
              "in a fresh copy of the working tree", flush=True)
        matrix = {None: run_graders(clean, rows, selected, tmp, "clean")}
        for i in rows:
            if not matrix[None][i]:
                violations.append(f"unmodified copy: grader of [{label(ASSIGNMENTS[i])}] fails")
        for r in rows:
            script, funcs = ASSIGNMENTS[r][0], ASSIGNMENTS[r][1]
            copy = tmp / f"row{r}"
            shutil.copytree(clean, copy)
            try:
                (copy / script).write_text(blank_functions((copy / script).read_text(), funcs))
            except (LookupError, ValueError) as e:
                violations.append(f"[{label(ASSIGNMENTS[r])}] cannot be blanked: {e}")
                shutil.rmtree(copy)
                continue
            matrix[r] = run_graders(copy, rows, selected, tmp, f"row{r}")
            shutil.rmtree(copy)
            print(f"  blanked [{label(ASSIGNMENTS[r])}] done", flush=True)

    # The matrix: one line per blanked row, one column per grader.
    print("\ncolumns = graders; '.' passes, 'F' own grader fails (wanted), 'd' fails through a")
    print("documented dependency, 'X' fails through an undocumented one, '!' own grader PASSES")
    width = max(len(label(ASSIGNMENTS[i])) for i in rows) + 2
    print(" " * (width + 9) + " ".join(f"{j + 1:>2}" for j in rows))
    for r in [None] + [r for r in rows if r in matrix]:
        cells = []
        for g in rows:
            passed = matrix[r][g]
            if r is None:
                cells.append("." if passed else "X")
            elif g == r:
                cells.append("!" if passed else "F")
                if passed:
                    violations.append(f"blanking [{label(ASSIGNMENTS[r])}] leaves its grader passing")
            elif passed:
                cells.append(".")
            elif any(f"{ASSIGNMENTS[r][0]}:{f}" in ASSIGNMENTS[g][3] for f in ASSIGNMENTS[r][1]):
                cells.append("d")
            else:
                cells.append("X")
                violations.append(f"blanking [{label(ASSIGNMENTS[r])}] fails the grader of "
                                  f"[{label(ASSIGNMENTS[g])}] (undocumented dependency)")
        name = "(unmodified)" if r is None else label(ASSIGNMENTS[r])
        row_no = "" if r is None else f"{r + 1:>2}"
        print(f"blank {row_no:>2} {name:<{width}} " + " ".join(f"{c:>2}" for c in cells))
    print("\ngraders:")
    for g in rows:
        print(f"  {g + 1:>2}: pytest {shlex.join(ASSIGNMENTS[g][2])}  ({len(selected[g])} tests)")
    if violations:
        print(f"\n{len(violations)} violation(s):")
        for v in violations:
            print(f"  - {v}")
        return 1
    print("\nOK: every grader fails on its own blanked exercise only, and passes on the unmodified copy")
    return 0


if __name__ == "__main__":
    sys.exit(main())
