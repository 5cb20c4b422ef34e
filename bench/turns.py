"""Runs benchmark processes that take turns (`ws2s bench ... --turns`, `pytorch_infer.py ...
--turns`): each is started and warmed up alone (the next starts once it prints `ready`), then
they run one timed run at a time, in turn, TURNS times, the order reversed every other turn (A B
C, C B A, ...), with a short pause between runs so that no side's idle threads still spin while
another runs. Each run of one side thus has a run of every other side within seconds, under the
same outside load: bench/compare-forward.sh pairs them turn by turn.

  turns.py TURNS OUT.jsonl -- CMD1 -- CMD2 [-- CMD3 ...]

Each CMD is one shell command whose standard output is one JSON object (its "runs" hold the
times of its turns in order); each object is appended to OUT.jsonl as one line. Exits non-zero,
appending nothing, if any side fails.

Also the pieces the sides and the summaries share: `Cues` (a side's end of the protocol, in
bench/pytorch_infer.py and bench/pytorch_step.py) and `median_interval` (compare-forward.sh and
compare.sh).
"""
import math
import statistics
import subprocess
import sys
import time

PAUSE_S = 0.25


class Cues:
    """A side's end of the protocol (as `ws2s bench --turns`), inert without turns: `ready` on
    stderr once the warm-up is done, a line read from stdin before each timed run (False at
    the end of the input), `turn SECONDS` on stderr after it."""

    def __init__(self, turns):
        self.turns = turns
        if turns:
            print("ready", file=sys.stderr, flush=True)

    def wait(self):
        return not self.turns or bool(sys.stdin.readline())

    def report(self, seconds):
        if self.turns:
            print(f"turn {seconds:.6f}", file=sys.stderr, flush=True)


def median_interval(values):
    """The median of `values` and its distribution-free 95% interval: order statistics j and
    n + 1 - j, j the largest with P(Binomial(n, 1/2) < j) <= 0.025 (None below 6 values)."""
    x = sorted(values)
    n, j, below = len(x), 0, 0.0
    while True:
        below += math.comb(n, j) / 2 ** n  # P(B <= j)
        if below > 0.025:
            break
        j += 1
    return statistics.median(x), ((x[j - 1], x[n - j]) if j else None)


def expect(proc, name, prefix):
    """The next line of `proc`'s stderr that starts with `prefix` (other lines are passed on)."""
    while True:
        line = proc.stderr.readline()
        if not line:
            proc.wait()
            sys.exit(f"turns.py: {name} ended (exit {proc.returncode}) before printing '{prefix}'")
        if line.startswith(prefix):
            return line
        sys.stderr.write(line)


def main():
    args = sys.argv[1:]
    if len(args) < 5 or args[2] != "--":
        sys.exit(__doc__)
    turns, out = int(args[0]), args[1]
    commands, current = [], []
    for a in args[3:]:
        if a == "--":
            commands.append(current)
            current = []
        else:
            current.append(a)
    commands.append(current)
    if any(not c for c in commands) or len(commands) < 2:
        sys.exit("turns.py: give at least two non-empty commands, each after --")
    procs = []
    try:
        for c in commands:
            p = subprocess.Popen(" ".join(c), shell=True, stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            procs.append(p)
            expect(p, c[0], "ready")
        for t in range(turns):
            order = range(len(procs)) if t % 2 == 0 else reversed(range(len(procs)))
            for i in order:
                time.sleep(PAUSE_S)
                procs[i].stdin.write("go\n")
                procs[i].stdin.flush()
                expect(procs[i], commands[i][0], "turn ")
        results = []
        for p, c in zip(procs, commands):
            p.stdin.close()
            text = p.stdout.read()
            rest = p.stderr.read()
            if p.wait() != 0:
                sys.stderr.write(rest)
                sys.exit(f"turns.py: {' '.join(c)} failed (exit {p.returncode})")
            results.append(text.strip())
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    with open(out, "a") as f:
        for r in results:
            f.write(r + "\n")


if __name__ == "__main__":
    main()
