"""What the write generators (dml.py, inserts.py) share: running one statement in a transaction
that is rolled back, on the distributed (d) or local (l) copy of the differential dataset."""
import os, subprocess

PORT = os.environ.get("FUZZ_PORT", "9800")
MARK = "--8<--"


def run_and_roll_back(schema, statement, table):
    """The return code, the statement's rows (sorted), the contents of `table` afterwards
    (sorted) and the error text."""
    p = subprocess.run(["psql", "-X", "-At", "-q", "-h", "127.0.0.1", "-p", PORT, "-U", "postgres", "-d", "postgres",
                        "-v", "ON_ERROR_STOP=1", "-c", f"SET search_path = {schema}, {schema}2; SET extra_float_digits = 0",
                        "-c", "BEGIN", "-c", statement, "-c", f"SELECT '{MARK}'", "-c", f"SELECT * FROM {table}", "-c", "ROLLBACK"],
                       capture_output=True, text=True)
    returned, _, contents = p.stdout.partition(MARK + "\n")
    return p.returncode, sorted(returned.splitlines()), sorted(contents.splitlines()), p.stderr.strip()


def compare(statement, table):
    """Runs `statement` on both sides; prints it when the distributed side refuses it or differs.
    None when one server rejects it; otherwise "same", "refused" or "differs"."""
    rl, al, cl, el = run_and_roll_back("l", statement, table)
    if rl != 0:
        return None
    rd, ad, cd, ed = run_and_roll_back("d", statement, table)
    # A NULL in a distribution column is refused, as documented (one server would store it).
    if rd != 0 and ("not supported" in ed or "null value in distribution column" in ed):
        print("REFUSED:", statement); print("  ", ed[:200])
        return "refused"
    if rd != 0 or al != ad or cl != cd:
        print("DIFF:", statement)
        print("  local:", al[:3], len(al), el[:150])
        print("  dist: ", ad[:3], len(ad), ed[:200])
        if cl != cd:
            print("  table contents differ:", len(cl), len(cd))
        return "differs"
    return "same"


class Tally:
    """What the generators print last: how many statements ran, were refused, differed."""

    def __init__(self):
        self.ran = self.refused = self.failures = 0

    def add(self, statement, table):
        outcome = compare(statement, table)
        if outcome is None:
            return
        self.ran += 1
        self.refused += outcome == "refused"
        self.failures += outcome == "differs"

    def report(self, n):
        print("done", n, "ran", self.ran, "refused", self.refused, "failures", self.failures)
